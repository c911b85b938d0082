"""generate -> score: FID, KID, IS, IC-LPIPS and the background metrics of one defect type's generated images."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness import weights
from harness.data.samples import read_samples, stand_in_summary
from harness.data.source import DataWhere, Source, load_split
from harness.io import read_jsonl, write_jsonl
from harness.metrics.iclpips_presets import PRESETS
from harness.metrics.score import ScoreConfig, Scorer, ScoreInputs
from harness.runner.kind import Job, JobContext, JobKind, RowsContext, job_resources
from harness.runner.plan import Plan
from harness.runner.store import PER_IMAGE_FILE

SCORE_MEMORY = 4 * 2**30


@dataclass(frozen=True)
class ScoreParams(Source):
    metrics: tuple[str, ...]
    ic_lpips: str  # the IC-LPIPS preset's name (harness.metrics.iclpips.PRESETS)
    profile: str
    resolution: int
    weights_used: dict  # network name -> the identity of its weights (harness.weights.identities)
    defect_type: str


@dataclass(frozen=True)
class ScoreWhere(DataWhere):
    weights: dict | None = None  # the suite's `weights:` (network name -> file on this machine)


class Score(JobKind[ScoreParams, ScoreWhere]):
    name, params_type, where_type = "score", ScoreParams, ScoreWhere
    timeout = 6 * 3600

    def expand(self, plan: Plan) -> list[Job]:
        suite = plan.suite
        profile = suite.profile
        needed = ("inception-v3-fid", "vgg16" if PRESETS[suite.ic_lpips].net == "vgg" else "alexnet")
        used = weights.identities(needed, profile, suite.weights)
        jobs = []
        for generates in plan.generated.values():
            for defect, generate in generates.items():
                p = generate.params
                params = ScoreParams(**Source.source_fields(p), metrics=tuple(suite.metrics),
                                     ic_lpips=suite.ic_lpips, profile=profile.name, resolution=profile.resolution,
                                     weights_used=used, defect_type=defect)
                where = ScoreWhere(**generate.where.data_fields(), weights=dict(suite.weights))
                jobs.append(self.job(generate.label.replace("generate ", "score ", 1), params, (generate.key,),
                                     job_resources(profile, memory=SCORE_MEMORY), generate.tags, where))
        return jobs

    def run(self, params: ScoreParams, where: ScoreWhere, ctx: JobContext) -> list[dict]:
        split = load_split(params, where, ctx.cache)
        parts = split.defects[params.defect_type]
        configured = tuple(sorted((where.weights or {}).items()))
        scorer_key = ("scorer", params.profile, params.resolution, params.ic_lpips, configured, params.metrics)
        if scorer_key not in ctx.cache:
            config = ScoreConfig(resolution=params.resolution, metrics=params.metrics,
                                 ic_lpips=PRESETS[params.ic_lpips], weights=configured)
            ctx.cache[scorer_key] = Scorer(params.profile, config)
        samples = ctx.only_dep() / "samples"
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

    def rows(self, job: Job, folder: Path, ctx: RowsContext) -> list[dict] | None:
        """One row per generated image (what per_image.jsonl holds); None for a job finished before it wrote one."""
        if not (folder / PER_IMAGE_FILE).is_file():
            return None
        samples = ctx.folders[job.deps[0]] / "samples"
        return [{"file": str(samples / row["image"]), **row} for row in read_jsonl(folder / PER_IMAGE_FILE)]


def _per_image_rows(inputs: ScoreInputs, samples: list[dict], measured: list[dict]) -> list[dict]:
    """One row per generated image: which it is and what it was made from (samples.jsonl), what was measured."""
    ids = samples or [{} for _ in measured]
    return [{"image": row.get("image") or path.name, "normal_id": row.get("normal_id"),
             "mask_id": row.get("mask_id"), "caption": row.get("caption"), **values}
            for path, row, values in zip(inputs.generated, ids, measured)]


SCORE = Score()
