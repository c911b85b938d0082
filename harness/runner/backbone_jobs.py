"""backbone -> fit: one diffusion backbone per data set, made before any diffusion method fits on it.

In the `tiny` profile the job pretrains the tiny backbone on the normal training images of the suite's categories
of that data set, or of its `pretrain_categories` (or finds it in results/cache/backbones/): one stand-in for every backbone name. In `paper` there
is one job per backbone the methods name (Method.backbone), resolving its weights (harness/weights.py). Fit jobs
of methods with a backbone depend on it and read the folder from its `backbone.json`.
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.diffusion import provision
from harness.io import atomic_write_json
from harness.paths import cache_dir
from harness.methods import discover
from harness.profiles import get_profile
from harness.runner.jobs import Job, JobContext, expander, job_kind, job_resources, make_job

JOB_FILE = "backbone.json"
MEMORY = 4 * 2**30
# The tiny pretraining heads the longest chain of a suite (no diffusion fit starts before it), so it takes two
# threads: 1.5x faster on a 2-core machine (measured), while the short jobs wait or fill other nodes
PRETRAIN_CPUS = 2


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
    suite = plan.suite
    names = backbone_names(suite)
    if not names:
        return []
    profile = get_profile(suite.profile)
    # tiny: one pretrained stand-in serves every backbone name; paper: each name is its own pretrained model
    groups = [None] if profile.name == "tiny" else names
    jobs = []
    for dataset in plan.datasets:
        normals = normal_images(plan, dataset)
        for name in groups:
            if name is None:
                config = provision.pretrain_config(suite.backbone, profile.resolution, f"{suite.where()}: backbone")
                provenance = f"tiny-pretrained:{provision.tiny_key(normals, config)}"
            else:
                provenance = provision.describe(provision.paper_backbone(suite.weights.get(name), name)[1], Path())
            params = {"profile": profile.name, "dataset": dataset.spec.name, "resolution": profile.resolution,
                      "normals": [{"category": n.category, "hashes": list(n.hashes)} for n in normals],
                      "pretrain": dict(suite.backbone), "code": provision.code_hash(), "provenance": provenance,
                      "name": name}
            where = {"paths": {n.category: [str(p) for p in n.paths] for n in normals},
                     "weights": suite.weights.get(name) if name else None}
            tags = {"dataset": dataset.spec.name, "backbone": provenance}
            if name:
                tags["backbone_name"] = name
            jobs.append(make_job("backbone", f"backbone {name or profile.name} {dataset.spec.name}", params,
                                 resources=job_resources(profile, num_cpus=PRETRAIN_CPUS if name is None else 1,
                                                         memory=MEMORY), tags=tags, where=where))
    return jobs


def backbone_job_for(plan, dataset_name: str, name: str | None = None) -> Job | None:
    """The backbone job of a data set (and, in `paper`, of the backbone `name`), if the plan has one."""
    for job in plan.jobs:
        if (job.kind == "backbone" and job.tags.get("dataset") == dataset_name
                and job.tags.get("backbone_name", name) == name):
            return job
    return None


def backbone_folder(job: Job, ctx: JobContext) -> Path | None:
    """The backbone folder a fit job's `backbone` dependency made, or None if it has none. The tiny backbone is
    found by its key in this machine's cache; Stable Diffusion is resolved again here (weights.py), so a results
    folder moved to another machine finds its backbone there."""
    for key in job.deps:
        info = ctx.deps[key] / JOB_FILE
        if info.is_file():
            made = json.loads(info.read_text())
            if made.get("kind") == "tiny-pretrained":
                return cache_dir("backbones") / made["key"]
            return provision.paper_backbone(job.where.get("backbone_weights"), made.get("name"))[0]
    return None


@job_kind("backbone")
def run_backbone(job: Job, ctx: JobContext) -> list[dict]:
    p = job.inputs
    normals = [provision.NormalImages(n["category"], tuple(Path(x) for x in p["paths"][n["category"]]),
                                      tuple(n["hashes"])) for n in p["normals"]]
    folder, info = provision.provision(p["profile"], normals, p["pretrain"], p["weights"], name=p.get("name"),
                                       announce=ctx.announce)
    atomic_write_json(ctx.folder / JOB_FILE, {"key": folder.name, "provenance": p["provenance"], "name": p.get("name"),
                                              **{k: v for k, v in info.items() if k not in ("config", "weights")}})
    return []
