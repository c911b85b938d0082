"""Scoring a set of generated images: IS, FID, KID, IC-LPIPS, LPIPS to real, background fidelity, mask alignment.

`Scorer` builds each network once (lazily) and reuses it across calls. Every value comes back as a
`MetricValue` with the number of images it was computed on and how (weights, resize path, settings), so a
record can say whether a feature extractor had random weights.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from harness.data.images import is_image_file, natural_key
from harness.data.samples import normal_file, read_samples
from harness.metrics.fidelity import RESIZE_PATH, InceptionFeatures, frechet_distance, inception_score, kernel_distance
from harness.metrics.iclpips import ICLPIPSConfig, ic_lpips
from harness.metrics.lpips_net import LPIPSNet
from harness.metrics.paired import PSNR_CAP, PairedSample, paired_metrics, psnr_from_error
from harness.metrics.specs import GENERATION, SPECS, names
from harness.profiles import Profile, get_profile

METRICS = names(family=GENERATION)  # what each is, its label, direction and minimum: harness/metrics/specs.py


def least(metric: str) -> int:
    """The number of inputs below which `metric` is flagged (its MetricSpec.minimum)."""
    return SPECS[metric].minimum[1]


IS_SPLITS = 10
# What `Scorer.score_per_image` measures per generated image. The set's values from them: lpips_to_real = mean of
# lpips_to_centre; bg_lpips, mask_iou = means (NaN left out); bg_psnr = PSNR of sum(bg_squared_error) /
# sum(bg_count) (pooled, paired.py); IS, FID, KID and IC-LPIPS are not means over images.
PER_IMAGE_PAIRED = {"bg_psnr": "bg_psnr", "bg_error": "bg_squared_error", "bg_count": "bg_count",
                    "bg_lpips": "bg_lpips", "mask_iou": "mask_iou"}
PER_IMAGE = ("nearest_centre", "lpips_to_centre", *PER_IMAGE_PAIRED.values())
IMAGE_FOLDERS, MASK_FOLDERS = ("images", "image"), ("masks", "mask")  # ours; the released samples of other projects


@dataclass
class MetricValue:
    metric: str
    value: float | None  # None: not computed, and `missing` says why
    n: int
    std: float | None = None
    details: dict = field(default_factory=dict)
    missing: str | None = None
    n_real: int | None = None  # the FID / KID reference set
    n_centres: int | None = None  # the IC-LPIPS centres
    below_minimum: bool = False  # fewer inputs than its MetricSpec.minimum: computed, and flagged

    def as_dict(self) -> dict:
        return asdict(self)


def not_computed(metric: str, n: int, reason: str, **sizes) -> MetricValue:
    return MetricValue(metric, None, n, missing=reason, **sizes)


@dataclass
class ScoreInputs:
    generated: list[Path]
    real: list[Path] = field(default_factory=list)  # FID / KID reference set
    centres: list[Path] = field(default_factory=list)  # IC-LPIPS centres (generator-training anomalies)
    masks: list[Path | None] = field(default_factory=list)
    normals: list[Path | None] = field(default_factory=list)  # the normal image each sample was made on

    @classmethod
    def from_folder(cls, folder: Path, real: Sequence[Path] = (), centres: Sequence[Path] = (),
                    normals_root: Path | None = None) -> "ScoreInputs":
        """A DefectBench output folder (samples.jsonl), or any folder of images: images/ and masks/ beside them (or
        image/ and mask/, as AnomalyDiffusion and DualAnoDiff release their samples), each mask found by its image's
        file name without the extension (their masks are often JPEG where the images are PNG, or the reverse).
        `normals_root`: the category folder the samples' normal images are relative to (default: as recorded)."""
        folder = Path(folder)
        rows = read_samples(folder)
        if rows:
            return cls([folder / r["image"] for r in rows], list(real), list(centres),
                       [folder / r["mask"] for r in rows], [normal_file(folder, r, normals_root) for r in rows])
        image_dir = next((folder / n for n in IMAGE_FOLDERS if (folder / n).is_dir()), folder)
        images = images_in(image_dir)
        mask_dir = next((folder / n for n in MASK_FOLDERS if (folder / n).is_dir()), None)
        by_stem = {p.stem: p for p in mask_dir.iterdir() if is_image_file(p)} if mask_dir else {}
        return cls(images, list(real), list(centres), [by_stem.get(p.stem) for p in images], [None] * len(images))


def images_in(folder: Path) -> list[Path]:
    """A plain folder's images in generation order, numbers compared as numbers (0, 1, 2, ..., 10, not 0, 1, 10, 2):
    DFMGAN's IC-LPIPS keeps the first 200 of each cluster in this order."""
    return sorted((p for p in Path(folder).iterdir() if is_image_file(p)), key=natural_key)


@dataclass(frozen=True)
class ScoreConfig:
    resolution: int = 128  # images enter Inception at this size (the profile's resolution)
    metrics: tuple[str, ...] = METRICS
    ic_lpips: ICLPIPSConfig = ICLPIPSConfig()
    isc_splits: int = IS_SPLITS
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    fidelity_seed: int = 2020  # torch-fidelity's default seed for IS shuffling and KID subsets
    weights: tuple[tuple[str, str], ...] = ()  # explicit weight files: (("inception-v3-fid", "/path"), ...)

    @classmethod
    def for_profile(cls, profile: str | Profile, **overrides) -> "ScoreConfig":
        return replace(cls(resolution=get_profile(profile).resolution), **overrides)


class Scorer:
    def __init__(self, profile: str | Profile = "tiny", config: ScoreConfig | None = None):
        self.profile = get_profile(profile)
        self.config = config or ScoreConfig.for_profile(self.profile)
        unknown = set(self.config.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; known: {', '.join(METRICS)}")
        self._inception: InceptionFeatures | None = None
        self._lpips: dict[str, LPIPSNet] = {}

    @property
    def inception(self) -> InceptionFeatures:
        if self._inception is None:
            self._inception = InceptionFeatures(self.profile, dict(self.config.weights).get("inception-v3-fid"))
        return self._inception

    def lpips(self, net: str) -> LPIPSNet:
        if net not in self._lpips:
            trunk = dict(self.config.weights).get("vgg16" if net == "vgg" else "alexnet")
            self._lpips[net] = LPIPSNet(net, self.profile, trunk)
        return self._lpips[net]

    def wants(self, *metrics: str) -> bool:
        return any(m in self.config.metrics for m in metrics)

    def score(self, inputs: ScoreInputs, progress: bool = False) -> list[MetricValue]:
        """One value per requested metric: computed, or not computed with the reason (never silently left out)."""
        return self.score_per_image(inputs, progress)[0]

    def score_per_image(self, inputs: ScoreInputs, progress: bool = False) -> tuple[list[MetricValue], list[dict]]:
        """`score`'s values, and one row per generated image with what is measured per image (PER_IMAGE)."""
        if not inputs.generated:
            raise ValueError("no generated images to score")
        values: list[MetricValue] = []
        rows: list[dict] = [{} for _ in inputs.generated]
        if self.wants("is", "fid", "kid"):
            values += self._fidelity(inputs, progress)
        if self.wants("ic_lpips", "lpips_to_real"):
            values += self._ic_lpips(inputs, progress, rows)
        if self.wants("bg_psnr", "bg_lpips", "mask_iou"):
            values += self._paired(inputs, rows)
        return [v for v in values if v.metric in self.config.metrics], rows

    def _fidelity(self, inputs: ScoreInputs, progress: bool) -> list[MetricValue]:
        cfg, res = self.config, self.config.resolution
        how = {**self.inception.provenance(), "resize": RESIZE_PATH.format(resolution=res), "backend": "torch-fidelity"}
        generated = self.inception.extract(inputs.generated, res, progress)
        n, n_real = len(inputs.generated), len(inputs.real)
        out = []
        if n >= cfg.isc_splits:
            isc = inception_score(generated["logits"], cfg.isc_splits, cfg.fidelity_seed)
            out.append(MetricValue("is", isc["value"], n, isc["std"], {**how, "splits": cfg.isc_splits},
                                   below_minimum=n < least("is")))
        else:
            out.append(not_computed("is", n, f"fewer generated images ({n}) than IS splits ({cfg.isc_splits})"))
        sizes = {"n_real": n_real}
        if n_real < 2 or n < 2:
            reason = (f"{n_real} real test image(s) of the defect type: FID and KID need at least 2" if n_real < 2
                      else f"{n} generated image: FID and KID need at least 2")
            return out + [not_computed("fid", n, reason, **sizes), not_computed("kid", n, reason, **sizes)]
        real = self.inception.extract_cached(inputs.real, res, progress)
        small = n_real < least("fid")
        out.append(MetricValue("fid", frechet_distance(generated["pool"], real["pool"])["value"], n, None, how,
                               below_minimum=small, **sizes))
        kid = kernel_distance(generated["pool"], real["pool"], cfg.kid_subsets, cfg.kid_subset_size, cfg.fidelity_seed)
        out.append(MetricValue("kid", kid["value"], n, kid["std"],
                               {**how, "subset_size": kid["subset_size"], "subsets": kid["subsets"]},
                               below_minimum=n_real < least("kid"), **sizes))
        return out

    def _ic_lpips(self, inputs: ScoreInputs, progress: bool, rows: list[dict]) -> list[MetricValue]:
        cfg = self.config.ic_lpips
        n, sizes = len(inputs.generated), {"n_centres": len(inputs.centres)}
        if not inputs.centres:
            reason = "no IC-LPIPS centres: the split gives the defect type no generator-training images"
            return [not_computed("ic_lpips", n, reason, **sizes), not_computed("lpips_to_real", n, reason, **sizes)]
        net = self.lpips(cfg.net)
        result = ic_lpips(net, inputs.generated, inputs.centres, cfg, progress=progress)
        for row, centre, distance in zip(rows, result.assignment, result.nearest):
            path = inputs.centres[int(centre)]  # named with its folder: <defect>/<file> in the MVTec layouts
            row.update(nearest_centre=f"{path.parent.name}/{path.name}", lpips_to_centre=float(distance))
        how = {**net.provenance(), "size": cfg.size, "cluster_cap": cfg.cluster_cap, "selection": cfg.selection,
               "seed": cfg.seed, "small_clusters": cfg.small_clusters, "centre_range": cfg.centre_range}
        details = {**how, "cluster_sizes": result.cluster_sizes, "clusters_used": result.clusters_used}
        if np.isnan(result.value):
            ic = not_computed("ic_lpips", n, "every IC-LPIPS cluster holds fewer than 2 generated images", **sizes)
            ic.details = details
        else:
            ic = MetricValue("ic_lpips", result.value, n, None, details, **sizes)
        return [ic, MetricValue("lpips_to_real", result.lpips_to_real, n, float(np.std(result.nearest)), how, **sizes)]

    def _paired(self, inputs: ScoreInputs, rows: list[dict]) -> list[MetricValue]:
        which = [i for i, (m, nrm) in enumerate(zip(inputs.masks, inputs.normals)) if m is not None and nrm is not None]
        paired = [PairedSample(inputs.generated[i], inputs.masks[i], inputs.normals[i]) for i in which]
        n = len(inputs.generated)
        wanted = [m for m in ("bg_psnr", "bg_lpips", "mask_iou") if self.wants(m)]
        if not paired:
            reason = "the samples were not made on a known normal image (no normal_id / mask in samples.jsonl)"
            return [not_computed(m, n, reason) for m in wanted]
        net = self.lpips(self.config.ic_lpips.net) if self.wants("bg_lpips") else None
        per_sample = paired_metrics(paired, net)
        for position, i in enumerate(which):
            rows[i].update({PER_IMAGE_PAIRED[k]: per_sample[k][position] for k in PER_IMAGE_PAIRED if k in per_sample})
        how = {"paired": len(paired), **(net.provenance() if net else {})}
        out = []
        for metric in wanted:
            values = [v for v in per_sample[metric] if not math.isnan(v)]
            if not values:
                out.append(not_computed(metric, len(paired), "no sample has pixels on both sides of its mask"))
            elif metric == "bg_psnr":  # pooled: the summed squared error over the summed count
                value = psnr_from_error(sum(per_sample["bg_error"]), sum(per_sample["bg_count"]))
                # at the cap the value is a bound: say so, and whether every background was identical
                capped = {"capped": bool(value >= PSNR_CAP), "identical": sum(per_sample["bg_error"]) == 0}
                out.append(MetricValue(metric, value, len(values), float(np.std(values)),
                                       {**how, "pooled": True, **capped}))
            else:
                rule = {"changed": "the |mask| most-changed pixels"} if metric == "mask_iou" else {}
                out.append(MetricValue(metric, float(np.mean(values)), len(values), float(np.std(values)),
                                       {**how, **rule}))
        return out
