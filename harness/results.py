"""Records as pandas DataFrames: one row per metric value, with everything needed to trace it.

Every reader checks what it reads: a finished job whose files are not what it wrote (harness.runner.store) raises
DamagedError naming the file, so no table is ever built from a truncated or half-deleted record set.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.runner.store import (DONE, RECORDS_FILE, DamagedError, RunStore, finished_problem, latest_run,
                                  read_records, read_status, runs_root, status_problem)

MISSING = "missing"  # a job of the run that has no status: not run yet, or the run was stopped


def load(suite: str | None = None, run: str | None = None, results: Path | None = None) -> pd.DataFrame:
    """Every record under results/runs (or one suite, or one run of it), each finished job counted once."""
    root = runs_root(results)
    rows, seen, damaged = [], set(), {}
    for path in sorted(root.glob(f"{suite or '*'}/{run or '*'}/jobs/*/{RECORDS_FILE}")):
        key = path.parent.name
        if key in seen or (read_status(path.parent) or {}).get("state") != DONE:
            continue
        problem = finished_problem(path.parent)
        if problem:
            damaged.setdefault(key, problem)
            continue
        seen.add(key)
        rows += read_records(path.parent)
    unrecovered = [problem for key, problem in damaged.items() if key not in seen]
    if unrecovered:
        raise DamagedError(f"{unrecovered[0]} (and {len(unrecovered) - 1} more); run the suite again to redo them"
                           if len(unrecovered) > 1 else f"{unrecovered[0]}; run the suite again to redo the job")
    return pd.DataFrame(rows)


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
