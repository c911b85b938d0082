"""Job kinds: the typed seam between the plan, the executors and the results.

A job is a node of the graph: its kind, its parameters (a frozen dataclass the kind declares), the keys of the jobs
it needs, the resources it asks for, tags copied into its records, and `where` its inputs lie on this machine (a
second dataclass of the kind). Its key hashes the kind, the parameters' JSON and the dependencies' keys, so a
finished job is found again by key and never recomputed. Parameters identify inputs by content (split manifest
hashes, image and weight hashes), never by where they lie: a results folder moved with its data resumes.

A kind (anomalib's Job/JobGenerator, read for the idea) is one object:

    class Score(JobKind[ScoreParams, ScoreWhere]):
        name, params_type, where_type = "score", ScoreParams, ScoreWhere
        weight = 1.0                                   # relative cost: the critical-path order only
        def expand(self, plan) -> list[Job]: ...        # its jobs, from the plan and its typed indexes
        def run(self, params, where, ctx) -> list[dict]: ...   # records (may be empty)
        def rows(self, job, folder, ctx) -> list[dict] | None: ...   # per-image rows for `export` (optional)

and is registered by name in harness/runner/kinds/__init__.py (KINDS); a plugin adds its own with KINDS.add.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from harness.errors import ConfigError
from harness.io import sha256_json

if TYPE_CHECKING:
    from harness.runner.plan import Plan

# Bump when what a job computes changes in a way its parameters do not show (e.g. a metric's definition).
JOB_SCHEMA_VERSION = 2  # 2: per-sample streams, pinned outputs, portable keys
HOUR = 3600
OMIT_NONE = {"omit_none": True}  # a field left out of the JSON (and so of the key) while it is None


def optional(default: Any = None) -> Any:
    """A parameter that exists only for some jobs of a kind: absent from the JSON while None, so that adding one
    keeps every other job's key."""
    return field(default=default, metadata=OMIT_NONE)


def to_json(value: Any) -> Any:
    """A params or where dataclass as the JSON its key hashes: dataclasses.asdict, less the unset optional fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def from_json(cls: type, data: Any, what: str = "") -> Any:
    """The dataclass `cls` back from to_json's form; a key it does not declare, or a missing one, is an error that
    names it (a manifest written by another version of a kind)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what or cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{what or cls.__name__}: unknown keys {sorted(unknown)}")
    values = {}
    for name, value in data.items():
        values[name] = _decode(hints[name], value, f"{what or cls.__name__}.{name}")
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{what or cls.__name__}: {err}") from None


def _decode(hint: Any, value: Any, what: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value, what)
    if origin is tuple and isinstance(value, list):
        inner = args[0] if args else Any
        return tuple(_decode(inner, v, what) for v in value)
    return value


P = TypeVar("P")
W = TypeVar("W")


@dataclass(frozen=True)
class NoWhere:
    """A kind whose inputs all come from its dependencies' folders."""


@dataclass(frozen=True)
class Job(Generic[P, W]):
    kind: str
    key: str
    label: str  # for people: "fit cutpaste synthetic/weave/hole f0 s0"
    params: P  # everything the job runs from, typed by its kind (JSON: to_json)
    deps: tuple[str, ...] = ()
    resources: dict = field(default_factory=lambda: {"num_cpus": 1})
    tags: dict = field(default_factory=dict)  # dataset, category, defect_type, method, fold, seed: copied into records
    where: W | None = None  # locations on this machine (data root, weight files): not in the key

    def as_dict(self, where: bool = True) -> dict:
        out = {"kind": self.kind, "key": self.key, "label": self.label, "params": to_json(self.params),
               "deps": list(self.deps), "resources": self.resources, "tags": self.tags}
        return {**out, "where": to_json(self.where)} if where and self.where is not None else out

    @classmethod
    def from_dict(cls, data: dict, kind: "JobKind") -> "Job":
        """A job as as_dict wrote it (the executor's argument, or a manifest's entry without `where`), typed by its
        kind (harness.runner.kinds.decode_job looks the kind up)."""
        where = data.get("where")
        return cls(data["kind"], data["key"], data["label"], from_json(kind.params_type, data["params"], data["label"]),
                   tuple(data["deps"]), data["resources"], data["tags"],
                   from_json(kind.where_type, where, data["label"]) if where is not None else None)


def job_key(kind: str, params: Any, deps: tuple[str, ...]) -> str:
    return sha256_json({"kind": kind, "params": to_json(params), "deps": sorted(deps),
                        "schema": JOB_SCHEMA_VERSION})[:20]


def job_resources(profile, num_cpus: int = 1, memory: int | None = None, gpu: bool = True) -> dict:
    """What a job declares: CPUs (its torch threads), memory, and, for a job that runs networks, the profile's
    share of a GPU (used only where the cluster has GPUs; see executors.ray_options)."""
    out: dict = {"num_cpus": num_cpus, "num_gpus": profile.gpu_share if gpu else 0}
    if memory:
        out["memory"] = memory
    return out


ANNOUNCE_FILE = "announce.txt"


@dataclass
class JobContext:
    """What a running job sees: its own folder, its dependencies' folders, and per-process objects."""

    folder: Path
    deps: dict[str, Path]  # dependency key -> that job's finished folder
    cache: dict[str, Any]  # lives as long as the worker process (networks built once per worker)
    label: str = ""

    def announce(self, line: str) -> None:
        """A line for the person watching the run (an estimate, a milestone): printed here, and kept in the job's
        folder, from where the Ray driver prints it too (workers' own output does not reach its console)."""
        print(line, flush=True)
        with open(self.folder / ANNOUNCE_FILE, "a", encoding="utf-8") as handle:
            handle.write(line.rstrip("\n") + "\n")

    def only_dep(self) -> Path:
        """The folder of the job's single dependency."""
        if len(self.deps) != 1:
            raise ValueError(f"job {self.label} has {len(self.deps)} dependencies, not one")
        return next(iter(self.deps.values()))


class JobKind(Generic[P, W]):
    """One kind of job: its typed parameters, how the plan expands into its jobs, and how one runs."""

    name: ClassVar[str]
    params_type: ClassVar[type]
    where_type: ClassVar[type] = NoWhere
    weight: ClassVar[float] = 1.0  # relative cost of one job, for the critical-path order only (never a result)
    # how long one job may run before it is stopped and recorded as failed (executor.timeouts overrides): generous,
    # so that only a hang reaches it (the paper profile's longest jobs on one GPU, with room to spare)
    timeout: ClassVar[float] = 24 * HOUR

    def expand(self, plan: "Plan") -> list[Job]:
        """This kind's jobs for the plan; the kinds before it in KINDS have expanded (their typed indexes are
        filled)."""
        return []

    def run(self, params: P, where: W, ctx: JobContext) -> list[dict]:
        raise NotImplementedError

    def rows(self, job: Job, folder: Path, ctx: "RowsContext") -> list[dict] | None:
        """One row per image of a finished job, for `defectbench export` (None: the kind has none)."""
        return None

    def job(self, label: str, params: P, deps: tuple[str, ...] = (), resources: dict | None = None,
            tags: dict | None = None, where: W | None = None) -> Job[P, W]:
        if not isinstance(params, self.params_type):
            raise TypeError(f"{self.name} job {label!r}: params are a {type(params).__name__}, not "
                            f"{self.params_type.__name__}")
        return Job(self.name, job_key(self.name, params, deps), label, params, tuple(deps),
                   resources or {"num_cpus": 1}, tags or {}, where)


@dataclass
class RowsContext:
    """What JobKind.rows sees: the folders of the run's jobs, where its data sets lie, a cache, and the suite's name
    (for the message that says how to redo a damaged job)."""

    folders: dict[str, Path]  # job key -> its folder (this run's or an earlier run's)
    data: dict[str, dict]  # data set -> {"root": ..., "captions": ...} from the run's manifest
    cache: dict
    suite: str


def topological(jobs: list[Job]) -> list[Job]:
    """Jobs ordered so every job comes after its dependencies (stable for independent jobs)."""
    by_key = {j.key: j for j in jobs}
    done: set[str] = set()
    ordered: list[Job] = []

    def visit(job: Job, stack: tuple[str, ...] = ()) -> None:
        if job.key in done:
            return
        if job.key in stack:
            raise ValueError(f"dependency cycle through {job.label}")
        for dep in job.deps:
            if dep in by_key:
                visit(by_key[dep], stack + (job.key,))
        done.add(job.key)
        ordered.append(job)

    for job in jobs:
        visit(job)
    return ordered
