"""Records as pandas DataFrames: one row per metric value, with everything needed to trace it."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.runner.store import RECORDS_FILE, RunStore, latest_run, read_records, read_status, runs_root


def load(suite: str | None = None, run: str | None = None, results: Path | None = None) -> pd.DataFrame:
    """Every record under results/runs (or one suite, or one run of it), each finished job counted once."""
    root = runs_root(results)
    pattern = f"{suite or '*'}/{run or '*'}/jobs/*/{RECORDS_FILE}"
    rows, seen = [], set()
    for path in sorted(root.glob(pattern)):
        key = path.parent.name
        if key in seen or (read_status(path.parent) or {}).get("state") != "done":
            continue
        seen.add(key)
        rows += read_records(path.parent)
    return pd.DataFrame(rows)


def job_folder(store: RunStore, key: str) -> Path:
    """Where a job of the run lives: its own run folder, or the earlier run it was reused from."""
    manifest = store.read_manifest() or {}
    return Path(manifest.get("locations", {}).get(key, store.job_dir(key)))


def run_records(store: RunStore) -> pd.DataFrame:
    """The records of the jobs of one run (wherever they were computed)."""
    manifest = store.read_manifest() or {}
    rows = []
    for job in manifest.get("jobs", []):
        rows += read_records(job_folder(store, job["key"]))
    return pd.DataFrame(rows)


def run_states(store: RunStore) -> dict[str, dict]:
    """key -> {job, state} for every job of the run (state: done, failed, or missing)."""
    manifest = store.read_manifest() or {}
    out = {}
    for job in manifest.get("jobs", []):
        status = read_status(job_folder(store, job["key"])) or {}
        out[job["key"]] = {"job": job, "state": status.get("state", "missing")}
    return out


def latest(suite: str, results: Path | None = None) -> RunStore | None:
    return latest_run(suite, results)
