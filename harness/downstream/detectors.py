"""anomalib's unsupervised detectors on the same split as the synthetic-based models.

Each detector is trained on the split's normal training images with anomalib's `Engine` (Lightning), predicts
an anomaly map and a score for every image of the real test part, and those maps are scored by
`harness.metrics.detection`, so every row of a table comes from the same metric code. anomalib's own
post-processing (normalisation, thresholds) and evaluator are switched off: every metric we compute is
threshold-free or sweeps all thresholds.

Backbones: anomalib builds them pretrained through timm / torchvision, which downloads. Here every backbone is
built without pretrained weights and then loaded from `harness.weights` (ImageNet weights from the config path,
the torch hub cache or a download), or left at a seeded random initialisation where the profile allows it;
what was used is recorded with every result. DRAEM has no pretrained backbone; its anomaly source is Perlin
noise (anomalib's generator with no DTD folder), since DTD cannot be downloaded here.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from unittest import mock

import numpy as np
import torch

from harness import weights
from harness.device import default_device
from harness.errors import WeightsError
from harness.downstream.data import ImageSet
from harness.profiles import Profile
from harness.registry import Registry


@dataclass(frozen=True)
class DetectorSpec:
    name: str  # key in models.yaml and suites
    label: str  # as tables print it
    anomalib_class: str
    constructor_keys: tuple[str, ...]  # which config keys the anomalib constructor takes


DETECTORS: Registry[DetectorSpec] = Registry("detector", DetectorSpec, hint=" (harness/downstream/models.yaml)")
for _spec in (
    DetectorSpec("patchcore", "PatchCore", "Patchcore", ("backbone", "layers", "coreset_sampling_ratio", "num_neighbors")),
    DetectorSpec("reverse_distillation", "RD4AD", "ReverseDistillation", ("backbone", "layers")),
    DetectorSpec("supersimplenet", "SuperSimpleNet", "Supersimplenet", ("backbone", "layers")),
    DetectorSpec("draem", "DRAEM (unsup.)", "Draem", ()),
    DetectorSpec("padim", "PaDiM", "Padim", ("backbone", "layers")),
    DetectorSpec("cfa", "CFA", "Cfa", ("backbone",)),
):
    DETECTORS.add(_spec.name, _spec)
HAS_PRE_TRAINED_FLAG = {"Patchcore", "ReverseDistillation", "Padim"}


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """Build anomalib models with randomly initialised backbones: timm's and torchvision's pretrained flags are
    forced off while the model is constructed (anomalib would otherwise download; weights are loaded after)."""
    import timm
    import torchvision

    create_model = timm.create_model

    def offline_create_model(*args, **kwargs):
        kwargs["pretrained"] = False
        return create_model(*args, **kwargs)

    class NoWeights:
        DEFAULT = None

    with mock.patch.object(timm, "create_model", offline_create_model), \
            mock.patch.object(torchvision.models, "get_model_weights", lambda *_: NoWeights):
        yield


def backbone_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The pretrained-feature trunks inside an anomalib model (timm feature extractors, torchvision graphs)."""
    from anomalib.models.components import TimmFeatureExtractor

    found = [m.feature_extractor for m in model.modules() if isinstance(m, TimmFeatureExtractor)]
    if not found:
        found = [m for m in model.modules() if isinstance(m, torch.fx.GraphModule)]
    return found


def load_backbone(model: torch.nn.Module, resolved: weights.ResolvedWeights) -> int:
    """Load torchvision ImageNet weights into every trunk (timm's ResNets use torchvision's names). Returns the
    number of tensors loaded; raises if a trunk took none (a wrong file)."""
    state = weights.load_state_dict(resolved)
    loaded = 0
    for trunk in backbone_modules(model):
        own = trunk.state_dict()
        matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not matching:
            raise WeightsError(f"{resolved.path}: no tensor fits the {resolved.name} backbone")
        trunk.load_state_dict(matching, strict=False)
        loaded += len(matching)
    return loaded


def build(name: str, config: dict, resolution: int, profile: str | Profile,
          explicit_weights: str | None = None, scratch: Path | None = None):
    """(anomalib model, resolved backbone weights or None)."""
    import anomalib.models as models

    spec = DETECTORS[name]
    cls = getattr(models, spec.anomalib_class)
    kwargs = {k: config[k] for k in spec.constructor_keys}
    if spec.anomalib_class in HAS_PRE_TRAINED_FLAG:
        kwargs["pre_trained"] = False
    if spec.anomalib_class == "Draem":  # an empty folder: Perlin noise as the anomaly source
        empty = Path(scratch or tempfile.mkdtemp())
        empty.mkdir(parents=True, exist_ok=True)
        kwargs["dtd_dir"] = str(empty)
    common = {"pre_processor": cls.configure_pre_processor(image_size=(resolution, resolution)),
              "post_processor": False, "evaluator": False, "visualizer": False}
    resolved = weights.resolve(config["backbone"], profile, explicit_weights) if "backbone" in config else None
    with no_downloads(), weights.seeded(weights.RANDOM_SEED):
        model = cls(**kwargs, **common)
        if spec.anomalib_class == "Draem":
            _resize_draem(model, config["reconstructive_width"], config["discriminative_width"])
    if resolved is not None and not resolved.is_random:
        load_backbone(model, resolved)
    return model, resolved


def _resize_draem(model, reconstructive_width: int, discriminative_width: int) -> None:
    """DRAEM's two sub-networks at other base widths (the tiny profile; anomalib fixes 128 and 64)."""
    from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork, ReconstructiveSubNetwork

    if reconstructive_width != 128:
        model.model.reconstructive_subnetwork = ReconstructiveSubNetwork(base_width=reconstructive_width,
                                                                         sspcab=model.sspcab)
    if discriminative_width != 64:
        model.model.discriminative_subnetwork = DiscriminativeSubNetwork(in_channels=6, out_channels=2,
                                                                         base_width=discriminative_width)


class _Items(torch.utils.data.Dataset):
    """An ImageSet as anomalib ImageItems (float images in [0, 1]; the model's pre-processor normalises)."""

    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from anomalib.data import ImageItem
        from torchvision.tv_tensors import Image, Mask

        image = torch.from_numpy(self.images.images[i]).permute(2, 0, 1).float() / 255.0
        return ImageItem(image=Image(image), gt_label=torch.tensor(bool(self.images.masks[i].any())),
                         gt_mask=Mask(torch.from_numpy(self.images.masks[i])), image_path=self.images.names[i])


def _loader(images: ImageSet, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    from anomalib.data import ImageBatch

    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(_Items(images), batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       collate_fn=ImageBatch.collate, num_workers=0)


def _train_data(loader: torch.utils.data.DataLoader):
    """A data module holding only a training loader: CFA reads its centroids from
    `trainer.datamodule.train_dataloader()`, and the Engine names its working folder after `name` / `category`."""
    from lightning.pytorch import LightningDataModule

    module = LightningDataModule.from_datasets()  # an empty module; its train loader is ours
    module.train_dataloader = lambda: loader
    module.name, module.category = "defectbench", "split"
    return module


def run(name: str, normal_train: ImageSet, test: ImageSet, config: dict, resolution: int,
        profile: str | Profile, seed: int, workdir: Path,
        explicit_weights: str | None = None) -> tuple[np.ndarray, np.ndarray, weights.ResolvedWeights | None]:
    """Train one detector and predict the test part: (maps (N, H, W), image scores (N,), backbone weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of timm and anomalib's own modules at import
        from anomalib.engine import Engine
        from lightning.pytorch import seed_everything

    workdir.mkdir(parents=True, exist_ok=True)
    accelerator = "gpu" if default_device().type == "cuda" else "cpu"
    batch = int(config.get("batch_size", 8))
    with _quiet():
        seed_everything(seed, workers=True, verbose=False)
        model, resolved = build(name, config, resolution, profile, explicit_weights, workdir / "no-dtd")
        engine = Engine(accelerator=accelerator, devices=1, max_epochs=config["max_epochs"], logger=False,
                        default_root_dir=workdir, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
        engine.fit(model, datamodule=_train_data(_loader(normal_train, batch, True, seed)))
        batches = engine.predict(model, dataloaders=_loader(test, batch, False, seed), return_predictions=True)
    maps = torch.cat([b.anomaly_map.reshape(len(b.anomaly_map), *b.anomaly_map.shape[-2:]) for b in batches])
    scores = torch.cat([b.pred_score.reshape(-1) for b in batches])
    if maps.shape[-2:] != (resolution, resolution):
        maps = torch.nn.functional.interpolate(maps[:, None].float(), size=(resolution, resolution),
                                               mode="bilinear", align_corners=False)[:, 0]
    return maps.float().numpy(), scores.double().numpy(), resolved


def _no_bar(iterable, **_):
    return iterable


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning and anomalib log a lot at INFO, warn about things that do not apply (no logger, no validation), and
    PatchCore and CFA draw progress bars of their own: none of it belongs in a job's output."""
    names = ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric",
             "lightning_fabric", "lightning_fabric.utilities.rank_zero", "anomalib")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    from anomalib.models.components.sampling import k_center_greedy
    from anomalib.models.image.cfa import torch_model as cfa

    try:
        with warnings.catch_warnings(), mock.patch.object(k_center_greedy, "tqdm", _no_bar), \
                mock.patch.object(cfa, "tqdm", _no_bar):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
