"""Downstream and detector jobs: what the generated defects are worth, against anomalib's detectors.

- `segment` and `classify`, per method x category x fold x seed, depend on the generate jobs of every defect
  type of the category (the models see every defect type at once, as in the papers).
- `detect`, per detector x category x fold x seed, needs only the data: it runs beside the generators.

Every job scores the same real test part with harness.metrics.detection and writes one record per metric, over
the whole test part (defect_type 'all') and per defect type (that type's images plus the normal test images).
"""
from __future__ import annotations

import numpy as np

from harness.data.splits import COMPAT_PROTOCOLS
from harness.downstream import data as ddata
from harness.downstream.config import model_config
from harness.downstream.detectors import DETECTORS
from harness.generation import read_samples, stand_in_summary
from harness.io import atomic_write_json
from harness.metrics import detection
from harness.profiles import get_profile
from harness.runner.generation_jobs import load_split, source_params, source_where, weights_used
from harness.runner.jobs import Job, JobContext, expander, job_kind, job_resources, make_job

DOWNSTREAM_KINDS = {"segmentation": "segment", "classification": "classify"}
DOWNSTREAM_MEMORY = 3 * 2**30
DETECTOR_MEMORY = 4 * 2**30


def _base_tags(dataset, category, split, seed: int) -> dict:
    return {"dataset": dataset.spec.name, "category": category.name, "fold": split.fold, "seed": seed,
            "protocol": split.protocol, "split_hash": split.manifest_hash}


def _generate_index(jobs: list[Job]) -> dict[tuple, dict[str, str]]:
    """(dataset, category, fold, seed, method label) -> {defect type: generate job key}."""
    index: dict[tuple, dict[str, str]] = {}
    for job in jobs:
        if job.kind == "generate":
            t = job.tags
            index.setdefault((t["dataset"], t["category"], t["fold"], t["seed"], t["method"]), {})[t["defect_type"]] = job.key
    return index


@expander
def downstream_jobs(plan) -> list[Job]:
    suite = plan.suite
    if not suite.downstream and not suite.detectors:
        return []
    profile = get_profile(suite.profile)
    generated = _generate_index(plan.jobs)
    models = [_model_params(entry, suite, profile) for entry in suite.downstream]
    detectors = [_model_params(entry, suite, profile) for entry in suite.detectors]
    jobs = []
    for dataset in plan.datasets:
        for category in dataset.categories:
            for split in plan.splits[(dataset.spec.name, category.name)]:
                for seed in suite.seeds:
                    tags = _base_tags(dataset, category, split, seed)
                    common = {**source_params(dataset, category, split, False), "profile": profile.name,
                              "resolution": profile.resolution, "seed": seed}
                    where = source_where(dataset)
                    at = f"{dataset.spec.name}/{category.name} f{split.fold} s{seed}"
                    for model in models:
                        jobs += _downstream(model, suite, generated, tags, common, at, profile, where)
                    for params, files in detectors:
                        spec = DETECTORS[params["model"]]
                        jobs.append(make_job("detect", f"detect {spec.label} {at}",
                                             {**common, **params, **_test_images(split.protocol)}, (),
                                             job_resources(profile, memory=DETECTOR_MEMORY),
                                             {**tags, "method": spec.label, "family": "unsupervised",
                                              "model": params["model"]}, {**where, **files}))
    return jobs


def _test_images(protocol: str) -> dict:
    """A compat protocol's segment and detect jobs read the test images as the published localisation code does
    (cv2; its classification code reads them with PIL, so classify jobs keep ours). Named in the key only there, so
    every other job keeps its key and its cached result."""
    return {"test_images": "cv2-bilinear"} if protocol in COMPAT_PROTOCOLS else {}


def _model_params(entry: dict, suite, profile) -> tuple[dict, dict]:
    """A model's or detector's resolved settings and the pretrained weights it will use (once per plan), and where
    a configured weights file lies (a job's `where`)."""
    config = model_config(entry["name"], profile, entry.get("config"))
    trunk = "resnet34" if entry["name"] == "classification" else config.get("backbone")
    return ({"model": entry["name"], "config": config, "weights_used": weights_used(suite, (trunk,))[trunk] if trunk else None},
            {"weights_file": suite.weights.get(trunk) if trunk else None})


def _downstream(model: tuple[dict, dict], suite, generated: dict, tags: dict, common: dict, at: str, profile,
                where: dict) -> list[Job]:
    out = []
    params, files = model
    name = params["model"]
    for method in suite.methods:
        keys = generated.get((tags["dataset"], tags["category"], tags["fold"], tags["seed"], method.label), {})
        if not keys or (name == "classification" and len(keys) < 2):
            continue  # nothing generated; or one defect type: nothing to classify
        reader = _test_images(tags["protocol"]) if name == "segmentation" else {}
        out.append(make_job(DOWNSTREAM_KINDS[name], f"{name} {method.label} {at}",
                            {**common, **params, **reader, "method": method.label, "generated": dict(sorted(keys.items()))},
                            tuple(sorted(keys.values())), job_resources(profile, memory=DOWNSTREAM_MEMORY),
                            {**tags, "method": method.label, "family": "synthetic", "model": name,
                             "selection": params["config"].get("select_on", "validation")}, {**where, **files}))
    return out


def _generated(job: Job, ctx: JobContext) -> ddata.ImageSet:
    return ddata.generated_set(_sample_folders(job, ctx), job.params["resolution"])


def _sample_folders(job: Job, ctx: JobContext) -> dict:
    return {defect: ctx.deps[key] / "samples" for defect, key in job.params["generated"].items()}


def _stand_in(job: Job, ctx: JobContext) -> str | None:
    """What stand-ins made in the generated samples a downstream model trains on (records say so)."""
    return stand_in_summary(row for folder in _sample_folders(job, ctx).values() for row in read_samples(folder))


@job_kind("segment")
def run_segment(job: Job, ctx: JobContext) -> list[dict]:
    from harness.device import autocast_type, default_device
    from harness.downstream import segmentation

    p, config = job.inputs, job.params["config"]
    split = load_split(p, ctx.cache)
    test = ddata.test_set(split, p["resolution"], p.get("test_images", ddata.DEFAULT_TEST_IMAGES))
    train, validation = ddata.hold_out(_generated(job, ctx), config["validation_fraction"], p["seed"])
    maps, scores, selection = segmentation.run(
        ddata.normal_set(split, "train", p["resolution"]), ddata.normal_set(split, "validation", p["resolution"]),
        train, validation, test, config, p["seed"])
    ddata.save_maps(ctx.folder / "maps.npz", test, maps, scores)
    atomic_write_json(ctx.folder / "selection.json", {"on": selection.on, "metric": selection.metric,
                                                      "history": selection.history, "best_epoch": selection.best_epoch,
                                                      "n_train": len(train), "n_validation": len(validation)})
    published = detection.image_scores_from_maps(maps, config["pool_kernel"], count_include_pad=True)
    stand_in = _stand_in(job, ctx)
    loco = ddata.test_regions(split, p["resolution"])
    # the precision the U-Net trained in here: bf16 only where this machine computes it natively (harness/device.py)
    precision = autocast_type(default_device(), config["autocast"])
    return [{**r, "selection": selection.on, "details": {"best_epoch": selection.best_epoch, "autocast": precision,
                                                         **r.get("details", {})},
             "stand_in": stand_in} for r in ddata.score_maps(test, maps, scores, published, loco)]


@job_kind("classify")
def run_classify(job: Job, ctx: JobContext) -> list[dict]:
    from harness.downstream import classification

    p, config = job.inputs, job.params["config"]
    split = load_split(p, ctx.cache)
    classes = sorted(p["generated"])
    test = ddata.test_set(split, p["resolution"])
    train, validation = ddata.hold_out(_generated(job, ctx), config["validation_fraction"], p["seed"])
    result, resolved = classification.run(train, validation, test, classes, config, p["profile"], p["seed"],
                                          p.get("weights_file"))
    atomic_write_json(ctx.folder / "classification.json", {**result, "weights": resolved.as_record()})
    common = {"random_weights": resolved.is_random, "weights": resolved.describe(), "stand_in": _stand_in(job, ctx)}
    records = [{"metric": "accuracy", "value": result["accuracy"], "n": result["n"], "defect_type": ddata.ALL, **common}]
    records += [{"metric": "class_accuracy", "value": value, "defect_type": defect,
                 "n": sum(1 for _, truth, _ in result["predictions"] if truth == defect), **common}
                for defect, value in result["per_class"].items()]
    return records


@job_kind("detect")
def run_detect(job: Job, ctx: JobContext) -> list[dict]:
    from harness.downstream import detectors

    p = job.inputs
    split = load_split(p, ctx.cache)
    test = ddata.test_set(split, p["resolution"], p.get("test_images", ddata.DEFAULT_TEST_IMAGES))
    maps, scores, resolved = detectors.run(p["model"], ddata.normal_set(split, "train", p["resolution"]), test,
                                           p["config"], p["resolution"], p["profile"], p["seed"], ctx.folder / "work",
                                           p.get("weights_file"))
    if not np.isfinite(maps).all() or not np.isfinite(scores).all():
        raise ValueError(f"{p['model']} produced non-finite anomaly scores")
    ddata.save_maps(ctx.folder / "maps.npz", test, maps, scores)
    common = {"random_weights": bool(resolved and resolved.is_random),
              "weights": resolved.describe() if resolved else "none (trained from scratch)"}
    # the published image-score rule is the U-Net's; a detector keeps its own image score under both evaluations
    loco = ddata.test_regions(split, p["resolution"])
    return [{**r, **common} for r in ddata.score_maps(test, maps, scores, scores, loco)]
