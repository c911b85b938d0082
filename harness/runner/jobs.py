"""Jobs, job kinds and graph expanders.

A job is a node of the graph: a kind (fit, generate, score, ...), the JSON parameters it runs from, the keys of
the jobs it needs, and the resources it declares. Its key hashes everything it depends on (its parameters and
its dependencies' keys), so a finished job is found again by key and never recomputed. Parameters identify
inputs by content (split manifest hashes, image hashes, weight file hashes), never by where they lie: the
locations (data root, caption file, weight files) are the job's `where`, which the key leaves out, so a results
folder moved or copied with its data resumes with nothing recomputed.

Kinds and expanders are registered, so new kinds of job (downstream models, detectors, backbone pretraining)
join the graph without touching the runner's core:

    @job_kind("score")
    def run_score(job: Job, ctx: JobContext) -> list[dict]: ...   # returns records (may be empty)

    @expander
    def generation_jobs(plan: Plan) -> list[Job]: ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from harness.io import sha256_json

if TYPE_CHECKING:
    from harness.runner.plan import Plan

# Bump when what a job computes changes in a way its parameters do not show (e.g. a metric's definition).
JOB_SCHEMA_VERSION = 2  # 2: per-sample streams, pinned outputs, portable keys


@dataclass(frozen=True)
class Job:
    kind: str
    key: str
    label: str  # for people: "fit cutpaste synthetic/weave/hole fold0 seed0"
    params: dict  # everything the job runs from (JSON)
    deps: tuple[str, ...] = ()
    resources: dict = field(default_factory=lambda: {"num_cpus": 1})
    tags: dict = field(default_factory=dict)  # dataset, category, defect_type, method, fold, seed: copied into records
    where: dict = field(default_factory=dict)  # locations on this machine (data root, weight files): not in the key

    @property
    def inputs(self) -> dict:
        """What the job runs from: its parameters and where its inputs lie."""
        return {**self.params, **self.where}

    def as_dict(self, where: bool = True) -> dict:
        out = {"kind": self.kind, "key": self.key, "label": self.label, "params": self.params, "deps": list(self.deps),
               "resources": self.resources, "tags": self.tags}
        return {**out, "where": self.where} if where else out

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        return cls(data["kind"], data["key"], data["label"], data["params"], tuple(data["deps"]), data["resources"],
                   data["tags"], data.get("where", {}))


def make_job(kind: str, label: str, params: dict, deps: tuple[str, ...] = (), resources: dict | None = None,
             tags: dict | None = None, where: dict | None = None) -> Job:
    key = sha256_json({"kind": kind, "params": params, "deps": sorted(deps), "schema": JOB_SCHEMA_VERSION})[:20]
    return Job(kind, key, label, params, tuple(deps), resources or {"num_cpus": 1}, tags or {}, where or {})


def job_resources(profile, num_cpus: int = 1, memory: int | None = None, gpu: bool = True) -> dict:
    """What a job declares: CPUs (its torch threads), memory, and, for a job that runs networks, the profile's
    share of a GPU (used only where the cluster has GPUs; see executors.ray_options)."""
    out: dict = {"num_cpus": num_cpus, "num_gpus": profile.gpu_share if gpu else 0}
    if memory:
        out["memory"] = memory
    return out


ANNOUNCE_FILE = "announce.txt"

# How long a job of each kind may run (seconds) before it is stopped and recorded as failed, unless the suite says
# otherwise (executor.timeouts). Generous on purpose: the paper profile's longest jobs on one GPU with room to
# spare (AnomalyDiffusion's fit of a category: its mask generator's 30k steps per defect type), so that only a hang
# reaches them; the tiny profile's jobs take minutes.
HOUR = 3600
DEFAULT_TIMEOUTS = {"backbone": 12 * HOUR, "pretrain": 24 * HOUR, "fit": 48 * HOUR, "generate": 24 * HOUR, "score": 6 * HOUR,
                    "segment": 12 * HOUR, "classify": 12 * HOUR, "detect": 12 * HOUR}
FALLBACK_TIMEOUT = 24 * HOUR  # a kind a plugin registers


@dataclass
class JobContext:
    """What a running job sees: its own folder, its dependencies' folders, and per-process objects."""

    folder: Path
    deps: dict[str, Path]  # dependency key -> that job's finished folder
    cache: dict[str, Any]  # lives as long as the worker process (networks built once per worker)

    def announce(self, line: str) -> None:
        """A line for the person watching the run (an estimate, a milestone): printed here, and kept in the job's
        folder, from where the Ray driver prints it too (workers' own output does not reach its console)."""
        print(line, flush=True)
        with open(self.folder / ANNOUNCE_FILE, "a", encoding="utf-8") as handle:
            handle.write(line.rstrip("\n") + "\n")

    def only_dep(self, job: Job) -> Path:
        """The folder of the single dependency of `job`."""
        if len(job.deps) != 1:
            raise ValueError(f"job {job.label} has {len(job.deps)} dependencies, not one")
        return self.deps[job.deps[0]]


JobRunner = Callable[[Job, JobContext], "list[dict] | None"]
JOB_KINDS: dict[str, JobRunner] = {}
EXPANDERS: list[Callable[["Plan"], list[Job]]] = []


def job_kind(name: str) -> Callable[[JobRunner], JobRunner]:
    def register(function: JobRunner) -> JobRunner:
        JOB_KINDS[name] = function
        return function
    return register


def expander(function: Callable[["Plan"], list[Job]]) -> Callable[["Plan"], list[Job]]:
    if function not in EXPANDERS:
        EXPANDERS.append(function)
    return function


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
