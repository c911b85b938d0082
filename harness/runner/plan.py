"""From a suite to a plan: data sets on disk, categories, splits, and the expanded job graph."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.data.layouts import MVTEC_AD, MVTEC_LOCO, list_categories, read_category
from harness.data.model import Category
from harness.data.splits import Split, make_splits
from harness.data.synth import SynthConfig
from harness.data.synth import cached as cached_synthetic
from harness.errors import ConfigError, DataError
from harness.methods import discover
from harness.runner.kind import Job, topological
from harness.runner.kinds import KINDS
from harness.runner.suite import DatasetSpec, Suite


@dataclass
class PreparedDataset:
    spec: DatasetSpec
    root: Path
    categories: list[Category]
    pretrain: list[Category] = field(default_factory=list)  # whose normal images fine-tune the tiny backbone


@dataclass(frozen=True)
class BackboneRef:
    """The backbone a data set's fits use: a job that makes or resolves it, or the shipped folder as it is."""

    provenance: str  # by content: goes into the fits' keys and every record
    job: Job | None = None
    folder: str | None = None  # the shipped folder on this machine, where there is no job


# (data set, category, fold, seed, method label): where a method's jobs of one category and split sit in the plan
RunAt = tuple[str, str, int, int, str]


@dataclass
class Plan:
    suite: Suite
    datasets: list[PreparedDataset]
    splits: dict[tuple[str, str], list[Split]] = field(default_factory=dict)  # (dataset, category) -> folds
    jobs: list[Job] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the data or the splits lack, said once per run
    # data set -> labels of the methods (chosen by `methods: all`) left out of it: they need captions it has none of
    left_out: dict[str, list[str]] = field(default_factory=dict)
    # typed indexes, filled by the kinds as they expand (in KINDS order), read by the kinds after them
    backbones: dict[tuple[str, str], BackboneRef] = field(default_factory=dict)  # (data set, backbone name) -> ref
    pretrains: dict[RunAt, Job] = field(default_factory=dict)  # a method's pretraining of a category
    fits: list[Job] = field(default_factory=list)
    generated: dict[RunAt, dict[str, Job]] = field(default_factory=dict)  # defect type -> its generate job
    method_hashes: dict[str, str] = field(default_factory=dict)  # method -> its files' hash, computed once per plan

    def by_key(self) -> dict[str, Job]:
        return {job.key: job for job in self.jobs}

    def backbone_for(self, dataset: str, name: str) -> BackboneRef:
        """The backbone the fits of a method that names backbone `name` use on a data set."""
        return self.backbones[(dataset, name)]


def prepare(suite: Suite) -> Plan:
    """Make the data exist (the synthetic set is written on demand), read it, and split it."""
    methods = discover()
    captioned = [m for m in suite.methods if "caption" in methods[m.method].cls.needs]
    datasets, left_out, warnings = [], {}, []
    for spec in suite.datasets:
        root = cached_synthetic(SynthConfig(**spec.synth)) if spec.layout == "synthetic" else spec.root
        names = list(spec.categories) if spec.categories else list_categories(root)
        available = set(list_categories(root))
        for name in [*names, *(spec.pretrain_categories or ())]:
            if name not in available:
                raise ConfigError(f"{suite.where()}: dataset {spec.name!r}: no category {name!r} in {root}; "
                                  f"found: {', '.join(sorted(available))}")
        needs_captions = bool(captioned)
        if captioned and not _has_captions(spec, root, names):
            named = [m.label for m in captioned if not m.from_all]
            if named:
                raise ConfigError(f"{suite.where()}: methods {named} need captions (MVTec Caption), and dataset "
                                  f"{spec.name!r} has none: no <category>/prompt/ folder in {root} and no "
                                  "'captions:' file in the suite's data set")
            left_out[spec.name], needs_captions = [m.label for m in captioned], False
            warnings.append(f"{spec.name}: {', '.join(left_out[spec.name])} left out: it needs captions (MVTec "
                            "Caption) and the data set has none (give 'captions: FILE.json' or prompt folders)")
        categories = [read_category(root, name, captions=spec.captions, require_captions=needs_captions,
                                    dataset=spec.name) for name in names]
        for category in categories:
            _check_layout(spec, category, suite)
        by_name = {c.name: c for c in categories}
        pretrain = [by_name.get(name) or read_category(root, name, dataset=spec.name)
                    for name in (spec.pretrain_categories or names)]
        datasets.append(PreparedDataset(spec, root, categories, pretrain))
    plan = Plan(suite, datasets, warnings=warnings, left_out=left_out)
    for dataset in datasets:
        for category in dataset.categories:
            splits = make_splits(category, suite.protocol)
            plan.splits[(dataset.spec.name, category.name)] = splits
            found = [f"{dataset.spec.name}: {w}" for w in (*category.warnings, *(w for s in splits for w in s.warnings()))]
            plan.warnings += [w for w in dict.fromkeys(found) if w not in plan.warnings]
        for category in dataset.pretrain:  # a pretraining-only category: its split's normal training images
            if (dataset.spec.name, category.name) not in plan.splits:
                plan.splits[(dataset.spec.name, category.name)] = make_splits(category, suite.protocol)
    return plan


def _check_layout(spec: DatasetSpec, category: Category, suite: Suite) -> None:
    expected = {"mvtec_ad": MVTEC_AD, "mvtec_loco": MVTEC_LOCO}.get(spec.layout)
    if expected and category.layout != expected:
        raise DataError(category.root, f"{suite.where()} says layout {spec.layout!r}, but this category is {category.layout!r}")


def _has_captions(spec: DatasetSpec, root: Path, names: list[str]) -> bool:
    """Whether the data set gives captions at all: a caption file, or a prompt folder in one of its categories."""
    from harness.data.captions import PROMPT_DIR

    return spec.captions is not None or any((Path(root) / name / PROMPT_DIR).is_dir() for name in names)


def expand(plan: Plan) -> list[Job]:
    """Every kind's jobs (KINDS, in order), de-duplicated by key, in dependency order. A kind reads what the kinds
    before it made from the plan's typed indexes (score reads plan.generated)."""
    jobs: dict[str, Job] = {}
    plan.backbones, plan.pretrains, plan.fits, plan.generated, plan.method_hashes = {}, {}, [], {}, {}
    for _, kind in KINDS.items():
        for job in kind.expand(plan):
            jobs.setdefault(job.key, job)
        plan.jobs = list(jobs.values())
    missing = {dep for job in jobs.values() for dep in job.deps if dep not in jobs}
    if missing:
        raise ValueError(f"jobs depend on keys no kind made: {sorted(missing)[:3]}")
    plan.jobs = topological(list(jobs.values()))
    return plan.jobs
