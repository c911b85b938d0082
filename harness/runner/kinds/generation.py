"""pretrain -> fit -> generate, for each method x category x defect type (or category) x fold x seed."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from harness.data.source import DataWhere, Source, load_split
from harness.generation import fit_method, generate_to
from harness.io import atomic_write_json, sha256_file, sha256_json
from harness.methods import Method, discover
from harness.profiles import get_profile
from harness.runner.kind import Job, JobContext, JobKind, job_resources, optional
from harness.runner.kinds.backbone import backbone_folder
from harness.runner.plan import Plan
from harness.tasks import build_task


@dataclass(frozen=True)
class MethodParams(Source):
    method: str  # the method's directory name
    method_hash: str  # its files' content (method_hash)
    profile: str
    resolution: int
    seed: int

    def build(self, config: dict) -> Method:
        return discover()[self.method].cls(config, get_profile(self.profile))


@dataclass(frozen=True)
class PretrainParams(MethodParams):
    settings: dict  # Method.pretrain_settings: what the pretraining depends on (shared by fits that agree on it)


@dataclass(frozen=True)
class FitParams(MethodParams):
    config: dict  # the method's resolved config
    defect_types: tuple[str, ...]  # one, or every defect type of the category (granularity: category)
    backbone: str | None = optional()  # the shipped backbone's provenance, where no job makes it
    pretrain: str | None = optional()  # the key of the pretrain job it starts from


@dataclass(frozen=True, kw_only=True)
class GenerateParams(FitParams):
    defect_type: str
    n: int
    fit: str  # the fit job's key


@dataclass(frozen=True)
class MethodWhere(DataWhere):
    backbone_weights: str | None = None  # a configured backbone folder (paper)
    backbone_folder: str | None = None  # the shipped backbone on this machine, where no job makes it
    backbone_job: str | None = None  # the key of the backbone job it depends on


def method_hash(directory: Path, bases: list[Path] = ()) -> str:
    """Content hash of a method directory and of the methods it builds on: editing a method recomputes its jobs (and
    those of the methods built on it), and only those. Its tests/ and its Markdown (README: the measured numbers
    rendered into it) are not part of it."""
    out = {}
    for root in [directory, *bases]:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".md" and not {
            "__pycache__", "tests"} & set(p.relative_to(root).parts))
        prefix = "" if root == directory else f"{root.name}:"
        out.update({prefix + str(p.relative_to(root)): sha256_file(p) for p in files})
    return sha256_json(out)[:16]


def _tags(dataset, split, seed: int, label: str, method: str) -> dict:
    return {"dataset": dataset.spec.name, "category": split.category.name, "method": label, "method_name": method,
            "fold": split.fold, "seed": seed, "protocol": split.protocol, "split_hash": split.manifest_hash}


def _each_run(plan: Plan):
    """(data set, split, seed, method spec, method info) for every fit the suite asks for."""
    infos = discover()
    for dataset in plan.datasets:
        for category in dataset.categories:
            for split in plan.splits[(dataset.spec.name, category.name)]:
                for seed in plan.suite.seeds:
                    for spec in plan.suite.methods:
                        if spec.label not in plan.left_out.get(dataset.spec.name, ()):
                            yield dataset, split, seed, spec, infos[spec.method]


def _method_params(plan: Plan, dataset, split, seed: int, spec, info) -> dict:
    profile = plan.suite.profile
    if spec.method not in plan.method_hashes:  # hashing a method's files (DFMGAN's: 20 MB) once per plan
        bases = [discover()[base].directory for base in info.cls.builds_on]
        plan.method_hashes[spec.method] = method_hash(info.directory, bases)
    source = Source.of(dataset.spec.name, split, "caption" in info.cls.needs)
    return {**source.source_fields(), "method": spec.method, "method_hash": plan.method_hashes[spec.method],
            "profile": profile.name, "resolution": profile.resolution, "seed": seed}


def _resources(plan: Plan, info) -> dict:
    profile = plan.suite.profile
    declared = info.cls.resources_for(profile.name)
    return job_resources(profile, int(declared["num_cpus"]), gpu=bool(declared["num_gpus"]))


def _where(plan: Plan, dataset, info) -> MethodWhere:
    data = DataWhere(str(dataset.root), str(dataset.spec.captions) if dataset.spec.captions else None)
    if not info.cls.uses_backbone:
        return MethodWhere(**data.data_fields())
    backbone = plan.backbone_for(dataset.spec.name, info.cls.backbone)
    return MethodWhere(**data.data_fields(), backbone_weights=plan.suite.weights.get(info.cls.backbone),
                       backbone_folder=backbone.folder, backbone_job=backbone.job.key if backbone.job else None)


class Pretrain(JobKind[PretrainParams, MethodWhere]):
    """Method.pretrain on a category's normal images (one per category, shared by the fits whose settings agree):
    the method built on its profile's defaults with the pretraining settings of the job's key in place."""

    name, params_type, where_type = "pretrain", PretrainParams, MethodWhere
    weight = 6.0

    def expand(self, plan: Plan) -> list[Job]:
        jobs: dict[str, Job] = {}
        for dataset, split, seed, spec, info in _each_run(plan):
            if not info.cls.pretrains:
                continue
            config = info.config(plan.suite.profile, spec.config)
            params = PretrainParams(**_method_params(plan, dataset, split, seed, spec, info),
                                    settings=info.cls.pretrain_settings(config))
            at = f"{dataset.spec.name}/{split.category.name}"
            job = self.job(f"pretrain {spec.method} {at} f{split.fold} s{seed}", params, (), _resources(plan, info),
                           {"dataset": dataset.spec.name, "category": split.category.name, "method_name": spec.method,
                            "fold": split.fold, "seed": seed}, _where(plan, dataset, info))
            job = jobs.setdefault(job.key, job)
            plan.pretrains[(dataset.spec.name, split.category.name, split.fold, seed, spec.label)] = job
        return list(jobs.values())

    def run(self, params: PretrainParams, where: MethodWhere, ctx: JobContext) -> list[dict]:
        info = discover()[params.method]
        profile = get_profile(params.profile)
        method = info.cls({**info.config(profile), **params.settings}, profile)
        task = build_task(load_split(params, where, ctx.cache), [], method.working_resolution(params.resolution),
                          params.seed)
        start = time.perf_counter()
        (ctx.folder / "work").mkdir(parents=True, exist_ok=True)
        method.pretrain(task, ctx.folder / "work")
        atomic_write_json(ctx.folder / "pretrain.json", {"seconds": round(time.perf_counter() - start, 3)})
        return []


class Fit(JobKind[FitParams, MethodWhere]):
    name, params_type, where_type = "fit", FitParams, MethodWhere
    weight = 2.0
    timeout = 48 * 3600  # AnomalyDiffusion's paper fit of a category: its mask generator's 30k steps per defect type

    def expand(self, plan: Plan) -> list[Job]:
        jobs = []
        for dataset, split, seed, spec, info in _each_run(plan):
            category = split.category
            config = info.config(plan.suite.profile, spec.config)
            backbone = plan.backbone_for(dataset.spec.name, info.cls.backbone) if info.cls.uses_backbone else None
            pretrain = plan.pretrains.get((dataset.spec.name, category.name, split.fold, seed, spec.label))
            tags = _tags(dataset, split, seed, spec.label, spec.method)
            if backbone is not None:
                tags["backbone"] = backbone.provenance
            deps = ((backbone.job.key,) if backbone and backbone.job else ()) + ((pretrain.key,) if pretrain else ())
            groups = [category.defect_types] if info.cls.granularity == "category" else [[d] for d in category.defect_types]
            for defects in groups:
                at = f"{dataset.spec.name}/{category.name}/{defects[0] if len(defects) == 1 else '*'}"
                params = FitParams(**_method_params(plan, dataset, split, seed, spec, info), config=config,
                                   defect_types=tuple(defects),
                                   backbone=backbone.provenance if backbone and not backbone.job else None,
                                   pretrain=pretrain.key if pretrain else None)
                job = self.job(f"fit {spec.label} {at} f{split.fold} s{seed}", params, deps, _resources(plan, info),
                               tags, _where(plan, dataset, info))
                plan.fits.append(job)
                jobs.append(job)
        return jobs

    def run(self, params: FitParams, where: MethodWhere, ctx: JobContext) -> list[dict]:
        method = params.build(params.config)
        task = build_task(load_split(params, where, ctx.cache), list(params.defect_types),
                          method.working_resolution(params.resolution), params.seed)
        task.backbone = backbone_folder(where, ctx)
        task.pretrained = ctx.deps[params.pretrain] / "work" if params.pretrain else None
        seconds = fit_method(method, task, ctx.folder / "work")
        atomic_write_json(ctx.folder / "fit.json", {"seconds": round(seconds, 3)})
        return []


class Generate(JobKind[GenerateParams, MethodWhere]):
    name, params_type, where_type = "generate", GenerateParams, MethodWhere

    def expand(self, plan: Plan) -> list[Job]:
        jobs = []
        for fit in plan.fits:
            p: FitParams = fit.params
            for defect in p.defect_types:
                params = GenerateParams(**{f: getattr(p, f) for f in p.__dataclass_fields__}, defect_type=defect,
                                        n=plan.suite.n_per_defect, fit=fit.key)
                job = self.job(f"generate {fit.tags['method']} {p.dataset}/{p.category}/{defect} f{p.fold} s{p.seed}",
                               params, fit.deps + (fit.key,), fit.resources, {**fit.tags, "defect_type": defect},
                               fit.where)
                at = (p.dataset, p.category, p.fold, p.seed, fit.tags["method"])
                plan.generated.setdefault(at, {})[defect] = job
                jobs.append(job)
        return jobs

    def run(self, params: GenerateParams, where: MethodWhere, ctx: JobContext) -> list[dict]:
        split = load_split(params, where, ctx.cache)
        method = params.build(params.config)
        task = build_task(split, list(params.defect_types), method.working_resolution(params.resolution), params.seed)
        task.backbone = backbone_folder(where, ctx)  # generate depends on the backbone job too: this machine's folder
        generate_to(method, task, params.defect_type, params.n, params.seed, ctx.folder / "samples",
                    ctx.deps[params.fit] / "work", meta={"split": split.manifest_hash, "protocol": split.protocol},
                    progress=False, resolution=params.resolution)
        return []


PRETRAIN, FIT, GENERATE = Pretrain(), Fit(), Generate()
