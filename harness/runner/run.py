"""`defectbench run SUITE`: plan, execute (Ray or serial), resume, summarise."""
from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


from harness.errors import DataWarning
from harness.io import sha256_json
from harness.provenance import code_version
from harness.runner.executors import Progress, Scheduler, run_ray, run_serial
from harness.runner.kind import Job
from harness.runner.plan import Plan, expand, prepare
from harness.runner.store import (FAILED, SKIPPED, DamagedError, RunLock, RunStore, now, outputs_digest, read_status,
                                  runs_root)
from harness.runner.suite import Suite


@dataclass
class RunResult:
    store: RunStore
    plan: Plan
    states: dict[str, str]

    @property
    def failed(self) -> list[str]:
        return [k for k, s in self.states.items() if s in (FAILED, SKIPPED)]


def resolved_config(suite: Suite) -> dict:
    """The suite as run, with no machine path in it: data sets, caption files, weight files and the suite file
    by their names (their content is in the job keys: split manifest hashes, weight hashes)."""
    data = dataclasses.asdict(suite)
    data["profile"] = suite.profile.name
    data.pop("executor")
    data.pop("description")
    data["path"] = suite.path.name if suite.path else None
    for dataset in data["datasets"]:
        for key in ("root", "captions"):
            dataset[key] = Path(dataset[key]).name if dataset[key] else None
    data["weights"] = {name: Path(path).name for name, path in suite.weights.items()}
    return json.loads(json.dumps(data, default=str))



def run_id_for(suite: Suite) -> str:
    """Runs are named by their resolved config: running the same suite again continues the same run."""
    config = resolved_config(suite)
    config.pop("path")
    return sha256_json(config)[:10]


def dry_run(plan: Plan, pending: list[str] = ()) -> str:
    """The plan in words; `pending`: the weights a run would download first (weights.no_downloads), where the keys
    of jobs that use a diffusion backbone are fixed only once its files are there."""
    jobs = plan.jobs
    kinds = Counter(j.kind for j in jobs)
    methods = Counter(j.tags.get("method", "-") for j in jobs)
    lines = [f"suite {plan.suite.name}: {len(jobs)} jobs ({', '.join(f'{v} {k}' for k, v in kinds.items())})",
             f"methods: {', '.join(f'{k} ({v})' for k, v in methods.items())}",
             f"categories: {', '.join(c.name for d in plan.datasets for c in d.categories)}",
             f"protocol {plan.suite.protocol}, profile {plan.suite.profile}, seeds {list(plan.suite.seeds)}", "",
             "job graph (first 30 jobs, each after the jobs it needs):"]
    by_key = plan.by_key()
    for job in jobs[:30]:
        needs = ", ".join(by_key[d].kind for d in job.deps)
        lines.append(f"  {job.key}  {job.label}" + (f"   <- {needs}" if needs else ""))
    if len(jobs) > 30:
        lines.append(f"  ... and {len(jobs) - 30} more")
    if pending:
        lines += ["", "not downloaded (a run downloads these first; the keys of jobs on a backbone shown here are "
                      "final once it has):", *(f"  {line}" for line in pending)]
    return "\n".join(lines)


def intact_closure(jobs: list[Job], found: dict[str, Path]) -> dict[str, Path]:
    """The finished jobs that can be reused: intact ones all of whose dependencies are reused too, with the very
    outputs they were computed from (a job redone because its files were damaged takes every job that depends on
    it along, in this run or a later one). `jobs` in dependency order."""
    reused: dict[str, Path] = {}
    digests: dict[str, str | None] = {}
    for job in jobs:
        if job.key not in found or not all(dep in reused for dep in job.deps):
            continue
        inputs = (read_status(found[job.key]) or {}).get("inputs", {})
        if all(inputs.get(dep) == digests[dep] for dep in job.deps):
            reused[job.key] = found[job.key]
            digests[job.key] = outputs_digest(found[job.key])
    return reused


def run_suite(suite: Suite, executor: str | None = None, address: str | None = None, num_cpus: int | None = None,
              results: Path | None = None, fresh: bool = False, progress: bool = True) -> RunResult:
    store = RunStore(runs_root(results), suite.name, run_id_for(suite))
    with RunLock(store) as lock:  # before planning, so that a second run of the suite stops at once
        plan = prepare(suite)
        expand(plan)
        for warning in plan.warnings:
            warnings.warn(warning, DataWarning, stacklevel=2)
        return _run_locked(plan, store, executor, address, num_cpus, fresh, progress, lock.processes)


def _run_locked(plan: Plan, store: RunStore, executor: str | None, address: str | None, num_cpus: int | None,
                fresh: bool, progress: bool, processes: Path | None = None) -> RunResult:
    suite = plan.suite
    if fresh and store.run_dir.exists():
        shutil.rmtree(store.run_dir)
    finished = {} if fresh else intact_closure(plan.jobs, store.finished(set(plan.by_key())))
    manifest = {
        "suite": suite.name, "run_id": store.run_id, "config": resolved_config(suite),
        "code": code_version(), "host": platform.node(), "python": sys.version.split()[0],
        "created": _previous(store).get("created", now()), "started": now(), "warnings": plan.warnings,
        "executor": executor or suite.executor.kind, "data": _data_roots(plan), "captions": _caption_files(plan),
        "jobs": [j.as_dict(where=False) for j in plan.jobs],
    }
    store.write_manifest(manifest)
    common = {"suite": suite.name, "run_id": store.run_id, "profile": suite.profile.name, "code_version": manifest["code"]["git"],
              "config_hash": store.run_id}
    scheduler = Scheduler(plan.jobs, finished, store.job_dir)
    bar = Progress(len(plan.jobs), len(finished), enabled=progress)
    try:
        if (executor or suite.executor.kind) == "serial":
            run_serial(scheduler, common, bar, suite.executor.timeout)
        else:
            run_ray(scheduler, common, bar, num_cpus or suite.executor.num_cpus, address or suite.executor.address,
                    suite.executor.max_retries, suite.executor.timeout, processes)
    finally:
        bar.close()
    manifest.update(finished=now(), states=dict(Counter(scheduler.state.values())), job_states=dict(scheduler.state),
                    locations={k: Path(v).relative_to(store.suite_dir).as_posix() for k, v in scheduler.location.items()
                               if Path(v).parent.parent != store.run_dir})
    store.write_manifest(manifest)
    return RunResult(store, plan, dict(scheduler.state))


def _data_roots(plan: Plan) -> dict:
    """Where this run found each data set (the synthetic one in the cache): the one machine-specific entry of a
    manifest, read by the leaderboard's sample grids; keys, records and the config hold no machine path."""
    return {d.spec.name: str(d.root) for d in plan.datasets}


def _caption_files(plan: Plan) -> dict:
    """Where this run found each data set's caption file (for re-reading its splits: `defectbench export`)."""
    return {d.spec.name: str(d.spec.captions) for d in plan.datasets if d.spec.captions}


def _previous(store: RunStore) -> dict:
    """The run's earlier manifest; a damaged one is replaced (everything in it is recomputed from the suite)."""
    try:
        return store.read_manifest() or {}
    except DamagedError as err:
        warnings.warn(f"{err.args[0].split(';')[0]}; writing a new one")
        return {}
