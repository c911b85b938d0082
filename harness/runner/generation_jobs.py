"""fit -> generate -> score, for each method x category x defect type (or category) x fold x seed."""
from __future__ import annotations

import time
from pathlib import Path

from harness.data.layouts import read_category
from harness.data.splits import Split, make_split
from harness.errors import DataError
from harness.generation import fit_method, generate_to, read_samples, stand_in_summary
from harness.io import atomic_write_json, sha256_file, sha256_json, write_jsonl
from harness.methods import Method, discover
from harness.metrics.iclpips import PRESETS
from harness.metrics.score import ScoreConfig, Scorer, ScoreInputs
from harness.profiles import get_profile
from harness.runner.jobs import Job, JobContext, expander, job_kind, job_resources, make_job
from harness.tasks import build_task
from harness import weights
from harness.runner.backbone_jobs import backbone_folder, backbone_for
from harness.runner.store import PER_IMAGE_FILE

SCORE_MEMORY = 4 * 2**30


def method_hash(directory: Path, bases: list[Path] = ()) -> str:
    """Content hash of a method directory and of the methods it builds on: editing a method recomputes its jobs (and
    those of the methods built on it), and only those."""
    out = {}
    for root in [directory, *bases]:
        files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        prefix = "" if root == directory else f"{root.name}:"
        out.update({prefix + str(p.relative_to(root)): sha256_file(p) for p in files})
    return sha256_json(out)[:16]


def source_params(dataset, category, split: Split, require_captions: bool) -> dict:
    """Which data a job reads, by content: the category and its split, identified by the split manifest's hash
    (every listed file's bytes and the captions), never by the folder it lies in (see source_where)."""
    return {"dataset": dataset.spec.name, "category": category.name, "protocol": split.protocol, "fold": split.fold,
            "split_hash": split.manifest_hash, "require_captions": require_captions}


def source_where(dataset) -> dict:
    """Where that data lies on this machine (a job's `where`, not part of its key)."""
    return {"root": str(dataset.root), "captions": str(dataset.spec.captions) if dataset.spec.captions else None}


def weights_used(suite, needed: tuple[str, ...]) -> dict:
    """Which weights a job will use, by content (ResolvedWeights.identity): part of its key, so results follow the
    weights and not the folder they were found in."""
    return {name: weights.resolve(name, suite.profile, suite.weights.get(name)).identity() for name in needed}


@expander
def generation_jobs(plan) -> list[Job]:
    suite = plan.suite
    profile = get_profile(suite.profile)
    infos = discover()
    preset = PRESETS[suite.ic_lpips]
    needed = ("inception-v3-fid", "vgg16" if preset.net == "vgg" else "alexnet")
    score_params = {"metrics": list(suite.metrics), "ic_lpips": suite.ic_lpips, "profile": profile.name,
                    "resolution": profile.resolution, "weights_used": weights_used(suite, needed)}
    method_hashes = {spec.method: method_hash(infos[spec.method].directory,
                                              [infos[base].directory for base in infos[spec.method].cls.builds_on])
                     for spec in suite.methods}
    configs = {spec.label: infos[spec.method].config(profile, spec.config) for spec in suite.methods}
    jobs, pretrains = [], {}
    for dataset in plan.datasets:
        for category in dataset.categories:
            for split in plan.splits[(dataset.spec.name, category.name)]:
                for seed in suite.seeds:
                    for spec in suite.methods:
                        if spec.label in plan.left_out.get(dataset.spec.name, ()):
                            continue
                        info = infos[spec.method]
                        backbone = (backbone_for(plan, dataset.spec.name, info.cls.backbone)
                                    if info.cls.uses_backbone else None)
                        requires = "caption" in info.cls.needs
                        source = source_params(dataset, category, split, requires)
                        where = source_where(dataset)
                        if backbone is not None:
                            where["backbone_weights"] = suite.weights.get(info.cls.backbone)
                            where["backbone_folder"] = backbone.folder  # the shipped one, where no job makes it
                        declared = info.cls.resources_for(profile.name)
                        resources = job_resources(profile, int(declared["num_cpus"]), gpu=bool(declared["num_gpus"]))
                        groups = ([category.defect_types] if info.cls.granularity == "category"
                                  else [[d] for d in category.defect_types])
                        at = f"{dataset.spec.name}/{category.name}"
                        pretrain = None
                        if info.cls.pretrains:  # one per category, shared by the fits whose settings agree
                            pretrain = make_job("pretrain", f"pretrain {spec.method} {at} f{split.fold} s{seed}",
                                                {**source, "method": spec.method,
                                                 "settings": info.cls.pretrain_settings(configs[spec.label]),
                                                 "method_hash": method_hashes[spec.method], "profile": profile.name,
                                                 "resolution": profile.resolution, "seed": seed}, (), resources,
                                                {"dataset": dataset.spec.name, "category": category.name,
                                                 "method_name": spec.method, "fold": split.fold, "seed": seed},
                                                where)
                            if pretrain.key not in pretrains:
                                pretrains[pretrain.key] = pretrain
                                jobs.append(pretrain)
                        for defects in groups:
                            tags = {"dataset": dataset.spec.name, "category": category.name, "method": spec.label,
                                    "method_name": spec.method, "fold": split.fold, "seed": seed,
                                    "protocol": split.protocol, "split_hash": split.manifest_hash}
                            if backbone is not None:
                                tags["backbone"] = backbone.provenance
                            fit = make_job("fit", f"fit {spec.label} {at}/{defects[0] if len(defects) == 1 else '*'} f{split.fold} s{seed}",
                                           {**source, "method": spec.method, "config": configs[spec.label],
                                            "method_hash": method_hashes[spec.method], "profile": profile.name,
                                            "resolution": profile.resolution, "defect_types": defects, "seed": seed,
                                            **({"backbone": backbone.provenance} if backbone and not backbone.job else {}),
                                            **({"pretrain": pretrain.key} if pretrain else {})},
                                           ((backbone.job.key,) if backbone and backbone.job else ())
                                           + ((pretrain.key,) if pretrain else ()), resources, tags, where)
                            jobs.append(fit)
                            for defect in defects:
                                defect_tags = {**tags, "defect_type": defect}
                                generate = make_job("generate", f"generate {spec.label} {at}/{defect} f{split.fold} s{seed}",
                                                    {**fit.params, "defect_type": defect, "n": suite.n_per_defect,
                                                     "fit": fit.key}, fit.deps + (fit.key,), resources, defect_tags,
                                                    where)
                                score = make_job("score", f"score {spec.label} {at}/{defect} f{split.fold} s{seed}",
                                                 {**source, **score_params, "defect_type": defect},
                                                 (generate.key,), job_resources(profile, memory=SCORE_MEMORY),
                                                 defect_tags, {**where, "weights": dict(suite.weights)})
                                jobs += [generate, score]
    return jobs


def load_split(params: dict, cache: dict) -> Split:  # params: a job's inputs (parameters and where)
    """Re-read the category and re-split it; the content hash must match the plan's, or the data changed."""
    key = ("split", params["root"], params["category"], params["protocol"], params["fold"], params["captions"])
    if key not in cache:
        category = read_category(Path(params["root"]), params["category"], captions=params["captions"],
                                 require_captions=params["require_captions"], dataset=params["dataset"])
        cache[key] = make_split(category, params["protocol"], params["fold"])
    split = cache[key]
    if split.manifest_hash != params["split_hash"]:
        raise DataError(split.category.root, "the data changed since the suite was planned (split manifest hash "
                                             "differs); run the suite again")
    return split


def _method(params: dict) -> Method:
    info = discover()[params["method"]]
    return info.cls(params["config"], get_profile(params["profile"]))


@job_kind("pretrain")
def run_pretrain(job: Job, ctx: JobContext) -> list[dict]:
    """Method.pretrain on the category's normal images: the method built on its profile's defaults with the
    pretraining settings of the job's key in place."""
    p = job.inputs
    info = discover()[p["method"]]
    profile = get_profile(p["profile"])
    method = info.cls({**info.config(profile), **p["settings"]}, profile)
    task = build_task(load_split(p, ctx.cache), [], method.working_resolution(p["resolution"]), p["seed"])
    start = time.perf_counter()
    (ctx.folder / "work").mkdir(parents=True, exist_ok=True)
    method.pretrain(task, ctx.folder / "work")
    atomic_write_json(ctx.folder / "pretrain.json", {"seconds": round(time.perf_counter() - start, 3)})
    return []


@job_kind("fit")
def run_fit(job: Job, ctx: JobContext) -> list[dict]:
    p = job.inputs
    method = _method(p)
    task = build_task(load_split(p, ctx.cache), p["defect_types"], method.working_resolution(p["resolution"]),
                      p["seed"])
    task.backbone = backbone_folder(job, ctx)
    task.pretrained = ctx.deps[p["pretrain"]] / "work" if p.get("pretrain") else None
    seconds = fit_method(method, task, ctx.folder / "work")
    atomic_write_json(ctx.folder / "fit.json", {"seconds": round(seconds, 3)})
    return []


@job_kind("generate")
def run_generate(job: Job, ctx: JobContext) -> list[dict]:
    p = job.inputs
    split = load_split(p, ctx.cache)
    method = _method(p)
    task = build_task(split, p["defect_types"], method.working_resolution(p["resolution"]), p["seed"])
    task.backbone = backbone_folder(job, ctx)  # generate depends on the backbone job too: this machine's folder
    generate_to(method, task, p["defect_type"], p["n"], p["seed"], ctx.folder / "samples",
                ctx.deps[p["fit"]] / "work", meta={"split": split.manifest_hash, "protocol": split.protocol},
                progress=False, resolution=p["resolution"])
    return []


@job_kind("score")
def run_score(job: Job, ctx: JobContext) -> list[dict]:
    p = job.inputs
    split = load_split(p, ctx.cache)
    parts = split.defects[p["defect_type"]]
    scorer_key = ("scorer", p["profile"], p["resolution"], p["ic_lpips"], tuple(sorted(p["weights"].items())),
                  tuple(p["metrics"]))
    if scorer_key not in ctx.cache:
        config = ScoreConfig(resolution=p["resolution"], metrics=tuple(p["metrics"]), ic_lpips=PRESETS[p["ic_lpips"]],
                             weights=tuple(sorted(p["weights"].items())))
        ctx.cache[scorer_key] = Scorer(p["profile"], config)
    samples = ctx.only_dep(job) / "samples"
    inputs = ScoreInputs.from_folder(samples, [s.image for s in parts.test], [s.image for s in parts.centres],
                                     normals_root=split.category.root)
    rows = read_samples(samples)
    stand_in = stand_in_summary(rows)
    values, per_image = ctx.cache[scorer_key].score_per_image(inputs)
    write_jsonl(ctx.folder / PER_IMAGE_FILE, _per_image_rows(inputs, rows, per_image))
    return [{"metric": v.metric, "value": v.value, "n": v.n, "std": v.std, "details": v.details,
             "random_weights": bool(v.details.get("random", False)), "missing": v.missing, "n_real": v.n_real,
             "n_centres": v.n_centres, "below_minimum": v.below_minimum, "stand_in": stand_in}
            for v in values]


def _per_image_rows(inputs: ScoreInputs, samples: list[dict], measured: list[dict]) -> list[dict]:
    """One row per generated image: which it is and what it was made from (samples.jsonl), what was measured."""
    ids = samples or [{} for _ in measured]
    return [{"image": row.get("image") or path.name, "normal_id": row.get("normal_id"),
             "mask_id": row.get("mask_id"), "caption": row.get("caption"), **values}
            for path, row, values in zip(inputs.generated, ids, measured)]
