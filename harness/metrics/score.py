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

from harness.data.images import is_image_file
from harness.generation import read_samples
from harness.metrics.fidelity import RESIZE_PATH, InceptionFeatures, frechet_distance, inception_score, kernel_distance
from harness.metrics.iclpips import ICLPIPSConfig, ic_lpips
from harness.metrics.lpips_net import LPIPSNet
from harness.metrics.paired import DIFF_THRESHOLD, PairedSample, paired_metrics
from harness.profiles import Profile, get_profile

METRICS = ("is", "fid", "kid", "ic_lpips", "lpips_to_real", "bg_psnr", "bg_lpips", "mask_iou")
# Which way is better: "up", "down", or None where the papers disagree on how to read it.
DIRECTION = {"is": "up", "fid": "down", "kid": "down", "ic_lpips": "up", "lpips_to_real": None, "bg_psnr": "up",
             "bg_lpips": "down", "mask_iou": "up"}
LABELS = {"is": "IS", "fid": "FID", "kid": "KID", "ic_lpips": "IC-LPIPS", "lpips_to_real": "LPIPS-real",
          "bg_psnr": "BG-PSNR", "bg_lpips": "BG-LPIPS", "mask_iou": "Mask-IoU"}
METRIC_GROUPS = {"background_fidelity": ("bg_psnr", "bg_lpips"), "mask_alignment": ("mask_iou",)}


@dataclass
class MetricValue:
    metric: str
    value: float
    n: int
    std: float | None = None
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScoreInputs:
    generated: list[Path]
    real: list[Path] = field(default_factory=list)  # FID / KID reference set
    centres: list[Path] = field(default_factory=list)  # IC-LPIPS centres (generator-training anomalies)
    masks: list[Path | None] = field(default_factory=list)
    normals: list[Path | None] = field(default_factory=list)  # the normal image each sample was made on

    @classmethod
    def from_folder(cls, folder: Path, real: Sequence[Path] = (), centres: Sequence[Path] = ()) -> "ScoreInputs":
        """A DefectBench output folder (samples.jsonl), or any folder of images (images/ and masks/ if present)."""
        folder = Path(folder)
        rows = read_samples(folder)
        if rows:
            return cls([folder / r["image"] for r in rows], list(real), list(centres),
                       [folder / r["mask"] for r in rows],
                       [Path(r["normal_path"]) if r.get("normal_path") else None for r in rows])
        image_dir = folder / "images" if (folder / "images").is_dir() else folder
        images = sorted(p for p in image_dir.iterdir() if is_image_file(p))
        masks = [(folder / "masks" / p.name) if (folder / "masks" / p.name).is_file() else None for p in images]
        return cls(images, list(real), list(centres), masks, [None] * len(images))


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if is_image_file(p))


@dataclass(frozen=True)
class ScoreConfig:
    resolution: int = 128  # images enter Inception at this size (the profile's resolution)
    metrics: tuple[str, ...] = METRICS
    ic_lpips: ICLPIPSConfig = ICLPIPSConfig()
    isc_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    fidelity_seed: int = 2020  # torch-fidelity's default seed for IS shuffling and KID subsets
    diff_threshold: float = DIFF_THRESHOLD
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
        if not inputs.generated:
            raise ValueError("no generated images to score")
        values: list[MetricValue] = []
        if self.wants("is", "fid", "kid"):
            values += self._fidelity(inputs, progress)
        if self.wants("ic_lpips", "lpips_to_real") and inputs.centres:
            values += self._ic_lpips(inputs, progress)
        if self.wants("bg_psnr", "bg_lpips", "mask_iou"):
            values += self._paired(inputs)
        return [v for v in values if v.metric in self.config.metrics]

    def _fidelity(self, inputs: ScoreInputs, progress: bool) -> list[MetricValue]:
        cfg, res = self.config, self.config.resolution
        how = {**self.inception.provenance(), "resize": RESIZE_PATH.format(resolution=res), "backend": "torch-fidelity"}
        generated = self.inception.extract(inputs.generated, res, progress)
        n = len(inputs.generated)
        out = []
        if n >= 2:
            isc = inception_score(generated["logits"], cfg.isc_splits, cfg.fidelity_seed)
            out.append(MetricValue("is", isc["value"], n, isc["std"], {**how, "splits": isc["splits"]}))
        if len(inputs.real) >= 2 and n >= 2:
            real = self.inception.extract_cached(inputs.real, res, progress)
            both = {**how, "n_real": len(inputs.real)}
            out.append(MetricValue("fid", frechet_distance(generated["pool"], real["pool"])["value"], n, None, both))
            kid = kernel_distance(generated["pool"], real["pool"], cfg.kid_subsets, cfg.kid_subset_size, cfg.fidelity_seed)
            out.append(MetricValue("kid", kid["value"], n, kid["std"],
                                   {**both, "subset_size": kid["subset_size"], "subsets": kid["subsets"]}))
        return out

    def _ic_lpips(self, inputs: ScoreInputs, progress: bool) -> list[MetricValue]:
        cfg = self.config.ic_lpips
        net = self.lpips(cfg.net)
        result = ic_lpips(net, inputs.generated, inputs.centres, cfg, progress=progress)
        how = {**net.provenance(), "size": cfg.size, "cluster_cap": cfg.cluster_cap, "selection": cfg.selection,
               "seed": cfg.seed, "small_clusters": cfg.small_clusters, "n_centres": len(inputs.centres)}
        n = len(inputs.generated)
        return [
            MetricValue("ic_lpips", result.value, n, None, {**how, "cluster_sizes": result.cluster_sizes,
                                                            "clusters_used": result.clusters_used}),
            MetricValue("lpips_to_real", result.lpips_to_real, n, float(np.std(result.nearest)), how),
        ]

    def _paired(self, inputs: ScoreInputs) -> list[MetricValue]:
        paired = [PairedSample(g, m, nrm) for g, m, nrm in zip(inputs.generated, inputs.masks, inputs.normals)
                  if m is not None and nrm is not None]
        if not paired:
            return []
        net = self.lpips(self.config.ic_lpips.net) if self.wants("bg_lpips") else None
        per_sample = paired_metrics(paired, net, self.config.diff_threshold)
        how = {"threshold": self.config.diff_threshold, **(net.provenance() if net else {})}
        out = []
        for metric, values in per_sample.items():
            finite = [v for v in values if not math.isnan(v)]
            if finite:
                out.append(MetricValue(metric, float(np.mean(finite)), len(finite), float(np.std(finite)), how))
        return out
