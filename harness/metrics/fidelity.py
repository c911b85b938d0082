"""IS, FID and KID through torch-fidelity, from one Inception pass per image set.

Backend: torch-fidelity's Inception-v3 (the TF-FID network) and its metric functions, for all three metrics.
Resize path, recorded with every value: images are loaded and resized to the profile's resolution with PIL's
antialiased bicubic filter (the same loader for real and generated images), then torch-fidelity resizes them to
299 x 299 with its TF1-compatible bilinear interpolation. Generated images are saved as PNG, never JPEG.

Without the Inception weights (as on machines without network), a profile that allows it uses a seeded random
Inception (He-normal convolutions, so activations neither vanish nor explode); every value says so.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Sequence
from unittest import mock

import numpy as np
import torch
from tqdm.auto import tqdm

from harness import weights
from harness.data.images import read_image
from harness.device import default_device
from harness.io import atomic_write_bytes, cached_file_hash, sha256_json
from harness.paths import cache_dir
from harness.profiles import Profile

RESIZE_PATH = "PIL bicubic to {resolution}px, then torch-fidelity TF1 bilinear to 299px"


def random_inception_weights(seed: int) -> Path:
    """A state dict for torch-fidelity's Inception with seeded random weights, written once to the cache.

    torch-fidelity offers no way to build its network without loading weights, so its loader is stubbed
    while the layers are built; the convolutions are then He-initialised.
    """
    path = cache_dir("weights") / f"inception-v3-fid-random-seed{seed}.pth"
    if path.is_file():
        return path
    with weights.seeded(seed):
        model = _build_inception({}, strict=False)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    atomic_write_bytes(path, _tensor_bytes(model.state_dict()))  # concurrent writers: unique temporary names
    return path


def _build_inception(state: dict, strict: bool = True):
    """torch-fidelity's FeatureExtractorInceptionV3 holding `state`, which we loaded ourselves (weights_only):
    its own loader calls torch.load(..., weights_only=False), which would run code hidden in a crafted file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fx

    cls = fx.FeatureExtractorInceptionV3
    load = cls.load_state_dict
    with mock.patch.object(fx, "load_state_dict_from_url", return_value=state), \
            mock.patch.object(cls, "load_state_dict", lambda self, sd, strict_=strict: load(self, sd, strict=strict_)):
        return cls("inception-v3-compat", ["2048", "logits_unbiased"])


def _tensor_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class InceptionFeatures:
    """torch-fidelity's Inception-v3: 2048-d pool features (FID, KID) and unbiased logits (IS) in one pass."""

    def __init__(self, profile: str | Profile = "tiny", weights_path: str | Path | None = None,
                 device: torch.device | None = None, batch_size: int = 32):
        self.resolved = weights.resolve("inception-v3-fid", profile, weights_path)
        path = self.resolved.path or random_inception_weights(self.resolved.seed)
        self.device = device or default_device()
        self.model = _build_inception(weights.load_file(path)).to(self.device)
        self.batch_size = batch_size

    def provenance(self) -> dict:
        return {"inception": self.resolved.describe(), "random": self.resolved.is_random}

    @torch.no_grad()
    def extract(self, paths: Sequence[Path], resolution: int, progress: bool = False) -> dict[str, torch.Tensor]:
        pools, logits = [], []
        for start in tqdm(range(0, len(paths), self.batch_size), desc="Inception features", disable=not progress,
                          leave=False):
            batch = np.stack([read_image(p, resolution) for p in paths[start:start + self.batch_size]])
            pool, logit = self.model(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(self.device))
            pools.append(pool.cpu())
            logits.append(logit.cpu())
        return {"pool": torch.cat(pools), "logits": torch.cat(logits)}

    def extract_cached(self, paths: Sequence[Path], resolution: int, progress: bool = False) -> dict[str, torch.Tensor]:
        """Features of a reference set, cached on disk by the files' contents, the weights and the resolution."""
        key = sha256_json({"weights": self.resolved.identity(), "resolution": resolution,
                           "files": [cached_file_hash(Path(p)) for p in paths]})
        path = cache_dir("inception") / f"{key}.pt"
        if path.is_file():
            cached = _cached_features(path, len(paths))
            if cached is not None:
                return cached
        features = self.extract(paths, resolution, progress)
        atomic_write_bytes(path, _tensor_bytes(features))
        return features


def _cached_features(path: Path, n: int) -> dict[str, torch.Tensor] | None:
    """A feature cache entry, or None (after a warning naming it, and deleting it) when it is damaged: a cache is a
    shortcut, never a reason to fail, so the features are then computed again."""
    try:
        features = torch.load(path, weights_only=True)
        if not (isinstance(features, dict) and all(len(features.get(k, ())) == n for k in ("pool", "logits"))):
            raise ValueError(f"not the features of {n} images")
    except Exception as err:
        warnings.warn(f"{path}: damaged Inception feature cache entry ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else 'unreadable'}); computing the features again")
        path.unlink(missing_ok=True)
        return None
    return features


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> dict:
    """torch-fidelity's IS with the standard 10 splits whatever the number of images (fewer splits would raise IS
    for small sets; harness.metrics.score flags sets below 100 images instead)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    if len(logits) < splits:
        raise ValueError(f"IS over {splits} splits needs at least {splits} images, got {len(logits)}")
    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=seed)
    return {"value": out["inception_score_mean"], "std": out["inception_score_std"], "splits": splits}


def frechet_distance(generated: torch.Tensor, real: torch.Tensor) -> dict:
    """FID between two feature sets: torch-fidelity's statistics, or the same number by a low-rank identity.

    With fewer images than feature dimensions (every few-shot set: a defect type has tens of test images), the
    covariances are AᵀA and BᵀB for the centred, 1/sqrt(n-1)-scaled features A and B, and tr sqrt(Σ1 Σ2) is the
    nuclear norm of A Bᵀ (the nonzero eigenvalues of AᵀA BᵀB are the squared singular values of A Bᵀ). That
    needs an n1 x n2 SVD instead of the eigenvalues of a 2048 x 2048 product (seconds per job), and it is exact
    where torch-fidelity adds sqrt(|noise|) of ~2000 spurious near-zero eigenvalues (about 1e-4 here). Tests check
    it against a thresholded eigenvalue computation and against torch-fidelity.
    """
    n1, n2, dims = len(generated), len(real), generated.shape[1]
    if min(n1, n2) < 2:
        raise ValueError(f"FID needs at least 2 images in each set (a covariance), got {n1} generated and {n2} real")
    if n1 * n2 > dims * dims:
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

        value = fid_statistics_to_metric(fid_features_to_statistics(generated), fid_features_to_statistics(real),
                                         verbose=False)
        return {"value": value["frechet_inception_distance"]}
    return {"value": _frechet_low_rank(generated.double().numpy(), real.double().numpy())}


def _frechet_low_rank(x: np.ndarray, y: np.ndarray) -> float:
    a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
    b = (y - y.mean(0)) / np.sqrt(len(y) - 1)
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    mean_term = float(np.sum((x.mean(0) - y.mean(0)) ** 2))
    return mean_term + float(np.sum(a * a) + np.sum(b * b) - 2 * cross)


def kernel_distance(generated: torch.Tensor, real: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 2020) -> dict:
    """torch-fidelity's KID (cubic polynomial kernel); subset size min(subset_size, n_real, n_generated)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(generated), len(real))
    out = kid_features_to_metric(generated, real, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return {"value": out["kernel_inception_distance_mean"], "std": out["kernel_inception_distance_std"],
            "subset_size": size, "subsets": subsets}
