"""Records as pandas DataFrames: one row per metric value, with everything needed to trace it.

Every reader checks what it reads: a finished job whose files are not what it wrote (harness.runner.store) raises
DamagedError naming the file, so no table is ever built from a truncated or half-deleted record set.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from harness.runner.store import (DONE, DamagedError, RunStore, finished_problem, latest_run, read_records, read_status,
                                  runs_root, status_problem)

MISSING = "missing"  # a job of the run that has no status: not run yet, or the run was stopped


def load(suite: str | None = None, run: str | None = None, results: Path | None = None) -> pd.DataFrame:
    """Every record under results/runs (or one suite, or one run of it), each finished job counted once. A job
    folder whose every copy is damaged (unreadable status, records or files not as written) is an error."""
    root = runs_root(results)
    rows, seen, damaged = [], set(), {}
    finished_by_run: dict[Path, dict] = {}
    for folder in sorted(p for p in root.glob(f"{suite or '*'}/{run or '*'}/jobs/*") if p.is_dir()):
        key = folder.name
        status = read_status(folder)
        if key in seen or (status is not None and status.get("state") != DONE):
            continue  # counted already, or a failed attempt
        run_dir = folder.parent.parent
        if run_dir not in finished_by_run:
            finished_by_run[run_dir] = _recorded_states(run_dir)
        if status is None and not status_problem(folder) and finished_by_run[run_dir].get(key) != DONE:
            continue  # a job in flight or killed before it finished: no records were published
        problem = finished_problem(folder)
        if problem:
            damaged.setdefault(key, problem)
            continue
        seen.add(key)
        rows += read_records(folder)
    unrecovered = [problem for key, problem in damaged.items() if key not in seen]
    if unrecovered:
        more = f" (and {len(unrecovered) - 1} more)" if len(unrecovered) > 1 else ""
        raise DamagedError(f"{unrecovered[0]}{more}; run the suite again to redo the damaged jobs")
    return pd.DataFrame(rows)


def _recorded_states(run_dir: Path) -> dict:
    """The job states a run's manifest recorded when it finished (empty for a stopped run or no manifest)."""
    try:
        return json.loads((run_dir / "manifest.json").read_text()).get("job_states", {})
    except (OSError, ValueError, AttributeError):
        return {}


def job_folder(store: RunStore, key: str, manifest: dict | None = None) -> Path:
    """Where a job of the run lives: its own run folder, or the earlier run it was reused from."""
    manifest = manifest if manifest is not None else (store.read_manifest() or {})
    location = manifest.get("locations", {}).get(key)
    return store.suite_dir / location if location else store.job_dir(key)  # locations: relative to the suite folder


def run_states(store: RunStore) -> dict[str, dict]:
    """key -> {job, state, folder} for every job of the run (state: done, failed, skipped or missing).

    Raises DamagedError naming the file when a job's status cannot be read, when the files of a finished job are
    not what it wrote, or when a job the run finished has lost its status."""
    manifest = store.read_manifest() or {}
    recorded = manifest.get("job_states", {})
    out = {}
    for job in manifest.get("jobs", []):
        folder = job_folder(store, job["key"], manifest)
        problem = status_problem(folder)
        status = read_status(folder)
        if status is None and not problem and recorded.get(job["key"]) == DONE:
            problem = f"{folder / 'status.json'}: missing, but the run finished this job"
        if status is not None and status.get("state") == DONE:
            problem = finished_problem(folder)
        if problem:
            raise DamagedError(f"{problem}; `defectbench run {store.suite}` redoes the job")
        state = status.get("state", MISSING) if status else recorded.get(job["key"], MISSING)
        out[job["key"]] = {"job": job, "state": state, "folder": folder}
    return out


def run_records(store: RunStore, states: dict[str, dict] | None = None) -> pd.DataFrame:
    """The records of the finished jobs of one run (wherever they were computed), checked as run_states checks."""
    states = states if states is not None else run_states(store)
    rows = []
    for state in states.values():
        if state["state"] == DONE:
            rows += read_records(state["folder"])
    return pd.DataFrame(rows)


def latest(suite: str, results: Path | None = None) -> RunStore | None:
    return latest_run(suite, results)
