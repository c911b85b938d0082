"""backbone -> fit: the diffusion backbone of each data set, found or made before any diffusion method fits on it.

Where the profile ships its backbone (`tiny`), every backbone name stands for the shipped tiny backbone
(harness/diffusion/shipped.py). Where it was trained on every normal training image of the data set's categories
(or of its `pretrain_categories`), fits use it as it is, with no job (a BackboneRef without one); otherwise one
`backbone` job fine-tunes it on those images (harness/diffusion/provision.py, cached in results/cache/backbones/).
Otherwise (`paper`) there is one job per backbone the methods name (Method.backbone), resolving its weights
(harness/weights.py). Fit and generate jobs depend on the job where there is one (their `where.backbone_job`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from harness import weights
from harness.diffusion import provision
from harness.errors import ConfigError
from harness.io import atomic_write_json
from harness.methods import discover
from harness.paths import cache_dir
from harness.runner.kind import JobContext, JobKind, job_resources, optional
from harness.runner.plan import BackboneRef, Plan

JOB_FILE = "backbone.json"
MEMORY = 4 * 2**30
# The fine-tuning heads the longest chain of a suite (no diffusion fit starts before it), so it takes two threads:
# 1.5x faster on a 2-core machine (measured), while the short jobs wait or fill other nodes
FINETUNE_CPUS = 2


@dataclass(frozen=True)
class NormalHashes:
    category: str
    hashes: tuple[str, ...]


@dataclass(frozen=True)
class BackboneParams:
    profile: str
    dataset: str
    resolution: int
    provenance: str
    name: str | None  # the pretrained backbone's name; None: the shipped one, fine-tuned on `normals`
    normals: tuple[NormalHashes, ...] | None = optional()  # the images it is fine-tuned on, by content
    finetune: dict | None = optional()  # the suite's `backbone:` settings
    shipped: str | None = optional()  # the shipped backbone's identity
    code: str | None = optional()  # provision.code_hash()


@dataclass(frozen=True)
class BackboneWhere:
    weights: str | None = None  # a configured weights folder (paper)
    paths: dict | None = None  # category -> its normal images' files on this machine (tiny)


def backbone_names(suite) -> list[str]:
    """The backbones the suite's methods fine-tune, by name (Method.backbone)."""
    infos = discover()
    return sorted({infos[spec.method].cls.backbone for spec in suite.methods if infos[spec.method].cls.uses_backbone})


def normal_images(plan: Plan, dataset) -> list[provision.NormalImages]:
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


def backbone_folder(where, ctx: JobContext) -> Path | None:
    """The backbone folder of a fit or generate job: the shipped folder it names, or what its backbone job made. A
    fine-tuned backbone is found by its key in this machine's cache; Stable Diffusion is resolved again here
    (weights.py), so a results folder moved to another machine finds its backbone there."""
    if where.backbone_folder:
        return Path(where.backbone_folder)
    if not where.backbone_job:
        return None
    made = json.loads((ctx.deps[where.backbone_job] / JOB_FILE).read_text())
    if made.get("kind") == "tiny-finetuned":
        return cache_dir("backbones") / made["key"]
    # the folder only: its identity was checked by the backbone job (hashing it again costs seconds per job)
    return weights.resolve_pipeline(made.get("name") or provision.PAPER_BACKBONE, where.backbone_weights).path


class Backbone(JobKind[BackboneParams, BackboneWhere]):
    name, params_type, where_type = "backbone", BackboneParams, BackboneWhere
    weight = 10.0
    timeout = 12 * 3600

    def expand(self, plan: Plan) -> list:
        suite = plan.suite
        names = backbone_names(suite)
        if not names:
            return []
        profile = suite.profile
        jobs = []
        for dataset in plan.datasets:
            normals = normal_images(plan, dataset)
            if profile.shipped_backbone:  # one backbone serves every name
                ref = self._shipped_ref(suite, profile, dataset, normals)
                plan.backbones.update({(dataset.spec.name, name): ref for name in names})
                jobs += [ref.job] if ref.job else []
                continue
            for name in names:
                provenance = provision.describe(provision.paper_backbone(suite.weights.get(name), name)[1], Path())
                params = BackboneParams(profile.name, dataset.spec.name, profile.resolution, provenance, name)
                job = self.job(f"backbone {name} {dataset.spec.name}", params,
                               resources=job_resources(profile, num_cpus=1, memory=MEMORY),
                               tags={"dataset": dataset.spec.name, "backbone": provenance, "backbone_name": name},
                               where=BackboneWhere(weights=suite.weights.get(name)))
                plan.backbones[(dataset.spec.name, name)] = BackboneRef(provenance, job)
                jobs.append(job)
        return jobs

    def _shipped_ref(self, suite, profile, dataset, normals: list[provision.NormalImages]) -> BackboneRef:
        """The shipped backbone where it has seen every one of `normals`, else a job that fine-tunes it on them."""
        folder = provision.shipped_folder()
        shipped = provision.shipped_identity(folder)
        if provision.shipped_covers(normals, folder):
            return BackboneRef(provision.describe({"kind": "shipped", "shipped": shipped}, folder), folder=str(folder))
        config = provision.finetune_config(suite.backbone, profile.resolution, f"{suite.where()}: backbone")
        key = provision.finetune_key(normals, config, shipped)
        provenance = provision.describe({"kind": "tiny-finetuned"}, Path(key))
        params = BackboneParams(profile.name, dataset.spec.name, profile.resolution, provenance, None,
                                normals=tuple(NormalHashes(n.category, tuple(n.hashes)) for n in normals),
                                finetune=dict(suite.backbone), shipped=shipped, code=provision.code_hash())
        where = BackboneWhere(paths={n.category: [str(p) for p in n.paths] for n in normals})
        job = self.job(f"backbone tiny {dataset.spec.name}", params,
                       resources=job_resources(profile, num_cpus=FINETUNE_CPUS, memory=MEMORY),
                       tags={"dataset": dataset.spec.name, "backbone": provenance}, where=where)
        return BackboneRef(provenance, job)

    def run(self, params: BackboneParams, where: BackboneWhere, ctx: JobContext) -> list[dict]:
        if params.name is None:  # the shipped backbone, fine-tuned on the data set's normal images
            if provision.shipped_identity(provision.shipped_folder()) != params.shipped:
                raise ConfigError(f"the shipped tiny backbone ({provision.shipped_folder()}) changed since the suite "
                                  f"was planned; run the suite again")
            normals = [provision.NormalImages(n.category, tuple(Path(x) for x in where.paths[n.category]), n.hashes)
                       for n in params.normals]
            config = provision.finetune_config(params.finetune, params.resolution)
            folder, info = provision.finetuned_backbone(normals, config, announce=ctx.announce)
        else:
            folder, info = provision.paper_backbone(where.weights, params.name)
            if provision.describe(info, folder) != params.provenance:
                raise ConfigError(f"the weights of {params.name} ({folder}) are not those the suite was planned "
                                  f"with ({params.provenance}); run the suite again")
        atomic_write_json(ctx.folder / JOB_FILE, {"key": folder.name, "provenance": params.provenance,
                                                  "name": params.name,
                                                  **{k: v for k, v in info.items() if k not in ("config", "weights")}})
        return []


BACKBONE = Backbone()
