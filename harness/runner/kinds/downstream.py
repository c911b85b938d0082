"""Downstream and detector jobs: what the generated defects are worth, against anomalib's detectors.

- `segment` and `classify`, per method x category x fold x seed, depend on the generate jobs of every defect
  type of the category (the models see every defect type at once, as in the papers).
- `detect`, per detector x category x fold x seed, needs only the data: it runs beside the generators.

Every job scores the same real test part with harness.metrics.detection and writes one record per metric, over
the whole test part (defect_type 'all') and per defect type (that type's images plus the normal test images).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness import weights
from harness.data.samples import read_samples, stand_in_summary
from harness.data.source import DataWhere, Source, load_split
from harness.data.splits import COMPAT_PROTOCOLS
from harness.downstream import data as ddata
from harness.downstream.config import DOWNSTREAM_MODELS, model_config
from harness.downstream.detectors import DETECTORS
from harness.runner.store import DamagedError
from harness.io import atomic_write_json
from harness.runner.kind import Job, JobContext, JobKind, RowsContext, job_resources, optional
from harness.runner.plan import Plan

DOWNSTREAM_MEMORY = 3 * 2**30
DETECTOR_MEMORY = 4 * 2**30
CV2_TEST_IMAGES = "cv2-bilinear"


@dataclass(frozen=True)
class ModelParams(Source):
    profile: str
    resolution: int
    seed: int
    model: str  # 'segmentation', 'classification', or a detector's name
    config: dict  # its resolved settings (harness/downstream/models.yaml)
    weights_used: str | None  # the identity of its pretrained trunk's weights, where it has one
    # a compat protocol's segment and detect jobs read the test images as the published localisation code does
    test_images: str | None = optional()

    def test_reader(self) -> str:
        return self.test_images or ddata.DEFAULT_TEST_IMAGES


@dataclass(frozen=True, kw_only=True)
class DownstreamParams(ModelParams):
    method: str  # the method's label in the suite
    generated: dict  # defect type -> the key of the generate job of its training images


@dataclass(frozen=True)
class ModelWhere(DataWhere):
    weights_file: str | None = None  # a configured trunk weights file on this machine


@dataclass(frozen=True)
class _Model:
    """A downstream model or detector of the suite, resolved once per plan."""

    name: str
    config: dict
    weights_used: str | None
    weights_file: str | None


def _models(plan: Plan, entries) -> list[_Model]:
    profile = plan.suite.profile
    out = []
    for entry in entries:
        config = model_config(entry["name"], profile, entry.get("config"))
        declared = DOWNSTREAM_MODELS.get(entry["name"])
        trunk = declared.trunk if declared else config.get("backbone")
        used = weights.identities((trunk,), profile, plan.suite.weights)[trunk] if trunk else None
        out.append(_Model(entry["name"], config, used, plan.suite.weights.get(trunk) if trunk else None))
    return out


def _each_split(plan: Plan):
    for dataset in plan.datasets:
        for category in dataset.categories:
            for split in plan.splits[(dataset.spec.name, category.name)]:
                for seed in plan.suite.seeds:
                    yield dataset, split, seed


def _common(plan: Plan, dataset, split, seed: int, model: _Model, cv2: bool) -> tuple[dict, dict, ModelWhere, str]:
    """The params every model job of a split shares, its tags, its where, and its label's tail."""
    profile = plan.suite.profile
    params = {**Source.of(dataset.spec.name, split, False).source_fields(), "profile": profile.name,
              "resolution": profile.resolution, "seed": seed, "model": model.name, "config": model.config,
              "weights_used": model.weights_used,
              # named in the key only there, so every other job keeps its key and its cached result
              "test_images": CV2_TEST_IMAGES if cv2 and split.protocol in COMPAT_PROTOCOLS else None}
    tags = {"dataset": dataset.spec.name, "category": split.category.name, "fold": split.fold, "seed": seed,
            "protocol": split.protocol, "split_hash": split.manifest_hash}
    where = ModelWhere(str(dataset.root), str(dataset.spec.captions) if dataset.spec.captions else None,
                       model.weights_file)
    return params, tags, where, f"{dataset.spec.name}/{split.category.name} f{split.fold} s{seed}"


class Downstream(JobKind[DownstreamParams, ModelWhere]):
    """A model trained on one method's generated images of a category, scored on the real test part."""

    params_type, where_type = DownstreamParams, ModelWhere
    weight = 2.0
    timeout = 12 * 3600
    model: str  # which of the suite's `downstream:` entries
    reads_cv2: bool  # reads the test images as the published code does under a compat protocol
    least_defect_types: int = 1  # a category with fewer generated defect types gets no job

    def expand(self, plan: Plan) -> list[Job]:
        jobs = []
        models = [m for m in _models(plan, plan.suite.downstream) if m.name == self.model]
        for dataset, split, seed in _each_split(plan):
            for model in models:
                common, tags, where, at = _common(plan, dataset, split, seed, model, self.reads_cv2)
                for method in plan.suite.methods:
                    generated = plan.generated.get((dataset.spec.name, split.category.name, split.fold, seed,
                                                    method.label), {})
                    if len(generated) < self.least_defect_types:
                        continue  # nothing generated (or, for the classifier, one defect type: nothing to tell apart)
                    keys = {defect: job.key for defect, job in sorted(generated.items())}
                    params = DownstreamParams(**common, method=method.label, generated=keys)
                    jobs.append(self.job(f"{self.model} {method.label} {at}", params, tuple(sorted(keys.values())),
                                         job_resources(plan.suite.profile, memory=DOWNSTREAM_MEMORY),
                                         {**tags, "method": method.label, "family": "synthetic", "model": self.model,
                                          "selection": model.config.get("select_on", "validation")}, where))
        return jobs

    def generated_set(self, params: DownstreamParams, ctx: JobContext) -> ddata.ImageSet:
        return ddata.generated_set(self._sample_folders(params, ctx), params.resolution)

    @staticmethod
    def _sample_folders(params: DownstreamParams, ctx: JobContext) -> dict[str, Path]:
        return {defect: ctx.deps[key] / "samples" for defect, key in params.generated.items()}

    def stand_in(self, params: DownstreamParams, ctx: JobContext) -> str | None:
        """What stand-ins made in the generated samples a downstream model trains on (records say so)."""
        return stand_in_summary(row for folder in self._sample_folders(params, ctx).values()
                                for row in read_samples(folder))


class Segment(Downstream):
    name, model, reads_cv2 = "segment", "segmentation", True

    def run(self, params: DownstreamParams, where: ModelWhere, ctx: JobContext) -> list[dict]:
        from harness.device import autocast_type, default_device
        from harness.downstream import segmentation
        from harness.metrics import detection

        config, resolution = params.config, params.resolution
        split = load_split(params, where, ctx.cache)
        test = ddata.test_set(split, resolution, params.test_reader())
        train, validation = ddata.hold_out(self.generated_set(params, ctx), config["validation_fraction"], params.seed)
        maps, scores, selection = segmentation.run(
            ddata.normal_set(split, "train", resolution), ddata.normal_set(split, "validation", resolution),
            train, validation, test, config, params.seed)
        ddata.save_maps(ctx.folder / "maps.npz", test, maps, scores)
        atomic_write_json(ctx.folder / "selection.json", {
            "on": selection.on, "metric": selection.metric, "history": selection.history,
            "best_epoch": selection.best_epoch, "n_train": len(train), "n_validation": len(validation)})
        published = detection.image_scores_from_maps(maps, config["pool_kernel"], count_include_pad=True)
        stand_in = self.stand_in(params, ctx)
        loco = ddata.test_regions(split, resolution)
        # the precision the U-Net trained in here: bf16 only where this machine computes it natively (device.py)
        precision = autocast_type(default_device(), config["autocast"])
        return [{**r, "selection": selection.on, "details": {"best_epoch": selection.best_epoch,
                                                             "autocast": precision, **r.get("details", {})},
                 "stand_in": stand_in} for r in ddata.score_maps(test, maps, scores, published, loco)]

    def rows(self, job: Job, folder: Path, ctx: RowsContext) -> list[dict]:
        return map_rows(job, folder, ctx)


class Classify(Downstream):
    name, model, reads_cv2 = "classify", "classification", False
    least_defect_types = 2

    def run(self, params: DownstreamParams, where: ModelWhere, ctx: JobContext) -> list[dict]:
        from harness.downstream import classification

        config = params.config
        split = load_split(params, where, ctx.cache)
        classes = sorted(params.generated)
        test = ddata.test_set(split, params.resolution)
        train, validation = ddata.hold_out(self.generated_set(params, ctx), config["validation_fraction"], params.seed)
        result, resolved = classification.run(train, validation, test, classes, config, params.profile, params.seed,
                                              where.weights_file)
        atomic_write_json(ctx.folder / "classification.json", {**result, "weights": resolved.as_record()})
        common = {"random_weights": resolved.is_random, "weights": resolved.describe(),
                  "stand_in": self.stand_in(params, ctx)}
        records = [{"metric": "accuracy", "value": result["accuracy"], "n": result["n"], "defect_type": ddata.ALL,
                    **common}]
        records += [{"metric": "class_accuracy", "value": value, "defect_type": defect,
                     "n": sum(1 for _, truth, _ in result["predictions"] if truth == defect), **common}
                    for defect, value in result["per_class"].items()]
        return records


class Detect(JobKind[ModelParams, ModelWhere]):
    """An anomalib detector trained on the split's normal training images only: it runs beside the generators."""

    name, params_type, where_type = "detect", ModelParams, ModelWhere
    weight = 3.0
    timeout = 12 * 3600

    def expand(self, plan: Plan) -> list[Job]:
        jobs = []
        detectors = _models(plan, plan.suite.detectors)
        profile = plan.suite.profile
        for dataset, split, seed in _each_split(plan):
            for model in detectors:
                common, tags, where, at = _common(plan, dataset, split, seed, model, True)
                spec = DETECTORS[model.name]
                jobs.append(self.job(f"detect {spec.label} {at}", ModelParams(**common), (),
                                     job_resources(profile, memory=DETECTOR_MEMORY),
                                     {**tags, "method": spec.label, "family": "unsupervised", "model": model.name},
                                     where))
        return jobs

    def run(self, params: ModelParams, where: ModelWhere, ctx: JobContext) -> list[dict]:
        from harness.downstream import detectors

        resolution = params.resolution
        split = load_split(params, where, ctx.cache)
        test = ddata.test_set(split, resolution, params.test_reader())
        maps, scores, resolved = detectors.run(params.model, ddata.normal_set(split, "train", resolution), test,
                                               params.config, resolution, params.profile, params.seed,
                                               ctx.folder / "work", where.weights_file)
        if not np.isfinite(maps).all() or not np.isfinite(scores).all():
            raise ValueError(f"{params.model} produced non-finite anomaly scores")
        ddata.save_maps(ctx.folder / "maps.npz", test, maps, scores)
        common = {"random_weights": bool(resolved and resolved.is_random),
                  "weights": resolved.describe() if resolved else "none (trained from scratch)"}
        # the published image-score rule is the U-Net's; a detector keeps its own image score under both evaluations
        loco = ddata.test_regions(split, resolution)
        return [{**r, **common} for r in ddata.score_maps(test, maps, scores, scores, loco)]

    def rows(self, job: Job, folder: Path, ctx: RowsContext) -> list[dict]:
        return map_rows(job, folder, ctx)


def map_rows(job: Job, folder: Path, ctx: RowsContext) -> list[dict]:
    """Per test image of a segment or detect job: label, defect type, image score, and its own pixel AUROC / AP where
    it has defect pixels."""
    from harness.metrics import detection

    params: ModelParams = job.params
    maps_file = folder / "maps.npz"
    with np.load(maps_file, allow_pickle=False) as saved:
        maps, scores, names = saved["maps"].astype(np.float32), saved["image_scores"], list(saved["names"])
    data = ctx.data.get(params.dataset)
    if data is None:
        raise DamagedError(f"the run's manifest.json records no root for data set {params.dataset!r}; "
                           f"`defectbench run {ctx.suite}` writes it again")
    split = load_split(params, DataWhere(data["root"], data.get("captions")), ctx.cache)
    key = ("test", id(split), params.resolution)
    if key not in ctx.cache:
        ctx.cache[key] = (ddata.test_samples(split), ddata.test_set(split, params.resolution))
    samples, test = ctx.cache[key]
    if [s.key for s in samples] != names or maps.shape != test.masks.shape:
        raise DamagedError(f"{maps_file}: its test images are not the split's ({len(names)} maps, "
                           f"{len(samples)} test images); `defectbench run {ctx.suite}` redoes the job")
    rows = []
    for sample, mask, value_map, score in zip(samples, test.masks, maps, scores):
        row = {"file": str(sample.image), "image_id": sample.key, "label": int(sample.defect_type != ddata.GOOD),
               "test_defect_type": sample.defect_type, "image_score": float(score),
               "pixel_auroc": None, "pixel_ap": None}
        if mask.any() and not mask.all():
            row.update(pixel_auroc=detection.auroc(mask, value_map), pixel_ap=detection.average_precision(mask, value_map))
        rows.append(row)
    return rows


SEGMENT, CLASSIFY, DETECT = Segment(), Classify(), Detect()
