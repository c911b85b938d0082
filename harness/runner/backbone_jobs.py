"""backbone -> fit: the diffusion backbone of each data set, found or made before any diffusion method fits on it.

In the `tiny` profile every backbone name stands for the shipped tiny backbone (harness/diffusion/shipped.py). Where
it was trained on every normal training image of the data set's categories (or of its `pretrain_categories`), fits
use it as it is, with no job (`BackboneRef` without one); otherwise one `backbone` job fine-tunes it on those images
(harness/diffusion/provision.py, cached in results/cache/backbones/). In `paper` there is one job per backbone the
methods name (Method.backbone), resolving its weights (harness/weights.py). Fit and generate jobs depend on the job
where there is one and read the folder from its `backbone.json`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from harness import weights
from harness.diffusion import provision
from harness.errors import ConfigError
from harness.io import atomic_write_json
from harness.paths import cache_dir
from harness.methods import discover
from harness.profiles import get_profile
from harness.runner.jobs import Job, JobContext, expander, job_kind, job_resources, make_job

JOB_FILE = "backbone.json"
MEMORY = 4 * 2**30
# The fine-tuning heads the longest chain of a suite (no diffusion fit starts before it), so it takes two threads:
# 1.5x faster on a 2-core machine (measured), while the short jobs wait or fill other nodes
FINETUNE_CPUS = 2


@dataclass(frozen=True)
class BackboneRef:
    """The backbone a data set's fits use: a job that makes or resolves it, or the shipped folder as it is."""

    provenance: str  # by content: goes into the fits' keys and every record
    job: Job | None = None
    folder: str | None = None  # the shipped folder on this machine, where there is no job


def backbone_names(suite) -> list[str]:
    """The backbones the suite's methods fine-tune, by name (Method.backbone)."""
    infos = discover()
    return sorted({infos[spec.method].cls.backbone for spec in suite.methods if infos[spec.method].cls.uses_backbone})


def normal_images(plan, dataset) -> list[provision.NormalImages]:
    """The normal training images of every pretraining category of `dataset` (its `pretrain_categories`, else the
    suite's categories; fold 0: every fold has the same)."""
    out = []
    for category in dataset.pretrain:
        split = plan.splits[(dataset.spec.name, category.name)][0]
        files = split.manifest["files"]
        rel = [str(s.image.relative_to(category.root)) for s in split.normal_train]
        out.append(provision.NormalImages(category.name, tuple(category.root / r for r in rel),
                                          tuple(files[r] for r in rel)))
    return out


@expander
def backbone_jobs(plan) -> list[Job]:
    plan.backbones = {}
    suite = plan.suite
    names = backbone_names(suite)
    if not names:
        return []
    profile = get_profile(suite.profile)
    jobs = []
    for dataset in plan.datasets:
        normals = normal_images(plan, dataset)
        if profile.name == "tiny":  # one backbone serves every name
            ref = _tiny_ref(suite, profile, dataset, normals)
            plan.backbones.update({(dataset.spec.name, name): ref for name in names})
            jobs += [ref.job] if ref.job else []
            continue
        for name in names:
            provenance = provision.describe(provision.paper_backbone(suite.weights.get(name), name)[1], Path())
            params = {"profile": profile.name, "dataset": dataset.spec.name, "resolution": profile.resolution,
                      "provenance": provenance, "name": name}
            job = make_job("backbone", f"backbone {name} {dataset.spec.name}", params,
                           resources=job_resources(profile, num_cpus=1, memory=MEMORY),
                           tags={"dataset": dataset.spec.name, "backbone": provenance, "backbone_name": name},
                           where={"weights": suite.weights.get(name)})
            plan.backbones[(dataset.spec.name, name)] = BackboneRef(provenance, job)
            jobs.append(job)
    return jobs


def _tiny_ref(suite, profile, dataset, normals: list[provision.NormalImages]) -> BackboneRef:
    """The shipped backbone where it has seen every one of `normals`, else a job that fine-tunes it on them."""
    folder = provision.shipped_folder()
    shipped = provision.shipped_identity(folder)
    if provision.shipped_covers(normals, folder):
        return BackboneRef(provision.describe({"kind": "shipped", "shipped": shipped}, folder), folder=str(folder))
    config = provision.finetune_config(suite.backbone, profile.resolution, f"{suite.where()}: backbone")
    key = provision.finetune_key(normals, config, shipped)
    provenance = provision.describe({"kind": "tiny-finetuned"}, Path(key))
    params = {"profile": profile.name, "dataset": dataset.spec.name, "resolution": profile.resolution,
              "normals": [{"category": n.category, "hashes": list(n.hashes)} for n in normals],
              "finetune": dict(suite.backbone), "shipped": shipped, "code": provision.code_hash(),
              "provenance": provenance, "name": None}
    where = {"paths": {n.category: [str(p) for p in n.paths] for n in normals}, "weights": None}
    job = make_job("backbone", f"backbone tiny {dataset.spec.name}", params,
                   resources=job_resources(profile, num_cpus=FINETUNE_CPUS, memory=MEMORY),
                   tags={"dataset": dataset.spec.name, "backbone": provenance}, where=where)
    return BackboneRef(provenance, job)


def backbone_for(plan, dataset_name: str, name: str) -> BackboneRef:
    """The backbone the fits of a method that names backbone `name` use on a data set."""
    return plan.backbones[(dataset_name, name)]


def backbone_folder(job: Job, ctx: JobContext) -> Path | None:
    """The backbone folder of a fit or generate job: the shipped folder it names, or what its `backbone` dependency
    made. A fine-tuned backbone is found by its key in this machine's cache; Stable Diffusion is resolved again here
    (weights.py), so a results folder moved to another machine finds its backbone there."""
    if job.where.get("backbone_folder"):
        return Path(job.where["backbone_folder"])
    for key in job.deps:
        info = ctx.deps[key] / JOB_FILE
        if info.is_file():
            made = json.loads(info.read_text())
            if made.get("kind") == "tiny-finetuned":
                return cache_dir("backbones") / made["key"]
            # the folder only: its identity was checked by the backbone job (hashing it again costs seconds per job)
            return weights.resolve_pipeline(made.get("name") or provision.PAPER_BACKBONE,
                                            job.where.get("backbone_weights")).path
    return None


@job_kind("backbone")
def run_backbone(job: Job, ctx: JobContext) -> list[dict]:
    p = job.inputs
    if p["name"] is None:  # tiny: the shipped backbone, fine-tuned on the data set's normal images
        if provision.shipped_identity(provision.shipped_folder()) != p["shipped"]:
            raise ConfigError(f"the shipped tiny backbone ({provision.shipped_folder()}) changed since the suite was "
                              f"planned; run the suite again")
        normals = [provision.NormalImages(n["category"], tuple(Path(x) for x in p["paths"][n["category"]]),
                                          tuple(n["hashes"])) for n in p["normals"]]
        config = provision.finetune_config(p["finetune"], p["resolution"])
        folder, info = provision.finetuned_backbone(normals, config, announce=ctx.announce)
    else:
        folder, info = provision.paper_backbone(p["weights"], p["name"])
        if provision.describe(info, folder) != p["provenance"]:
            raise ConfigError(f"the weights of {p['name']} ({folder}) are not those the suite was planned with "
                              f"({p['provenance']}); run the suite again")
    atomic_write_json(ctx.folder / JOB_FILE, {"key": folder.name, "provenance": p["provenance"], "name": p["name"],
                                              **{k: v for k, v in info.items() if k not in ("config", "weights")}})
    return []
