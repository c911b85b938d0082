"""Records as pandas DataFrames: one row per metric value, with everything needed to trace it.

Every reader checks what it reads: a finished job whose files are not what it wrote (harness.runner.store) raises
DamagedError naming the file, so no table is ever built from a truncated or half-deleted record set.
"""
from __future__ import annotations

import json
import re
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


# ---- per image ---------------------------------------------------------------------------------------------

PER_IMAGE_KINDS = ("score", "segment", "detect")
ALL = "all"  # harness.downstream.data.ALL: the defect_type of a model's job, which covers the whole test part
SCORE_COLUMNS = ("file", "image", "normal_id", "mask_id", "caption", "nearest_centre", "lpips_to_centre", "bg_psnr",
                 "bg_squared_error", "bg_count", "bg_lpips", "mask_iou")
MAP_COLUMNS = ("file", "image_id", "label", "test_defect_type", "image_score", "pixel_auroc", "pixel_ap")
JOB_COLUMNS = ("suite", "run_id", "job_key", "kind", "method", "model", "dataset", "category", "defect_type",
               "fold", "seed")


def find_run(suite: str, run: str | None = None, results: Path | None = None) -> RunStore:
    """A run of a suite (its latest by default); an error naming what is missing otherwise."""
    from harness.errors import DefectBenchError
    from harness.runner.suite import path_component

    path_component(suite, str(runs_root(results)), "suite")  # '..' or '/' would reach outside results/ (export)
    if run:
        path_component(run, str(runs_root(results)), "run")
    store = RunStore(runs_root(results), suite, run) if run else latest_run(suite, results)
    if store is None or not store.run_dir.is_dir():
        where = runs_root(results) / suite / (run or "")
        raise DefectBenchError(f"{where}: no run of suite {suite!r} there; `defectbench run {suite}` makes one")
    return store


def load_per_image(suite: str, run: str | None = None, results: Path | None = None,
                   kinds: tuple[str, ...] = PER_IMAGE_KINDS) -> pd.DataFrame:
    """One row per image of a run's finished jobs (its latest run by default), with the job's columns (JOB_COLUMNS).

    score jobs: one row per generated image (its file, normal / mask ids, caption, nearest IC-LPIPS centre and the
    LPIPS to it, BG-PSNR with the squared error and pixel count it pools, BG-LPIPS, Mask-IoU: harness.metrics.score
    PER_IMAGE). segment and detect jobs: one row per test image (file, label, defect type, image score, and where
    the image has defect pixels its own pixel AUROC and AP), from the job's maps.npz and the split's masks. Each
    kind says what its rows are (JobKind.rows). Score jobs finished before they wrote per-image files have no rows;
    `attrs["without_rows"]` names them."""
    from harness.runner.kind import RowsContext
    from harness.runner.kinds import KINDS, decode_job

    store = find_run(suite, run, results)
    states = run_states(store)
    manifest = store.read_manifest() or {}
    data = {name: {"root": root, "captions": manifest.get("captions", {}).get(name)}
            for name, root in manifest.get("data", {}).items()}
    context = RowsContext({key: state["folder"] for key, state in states.items()}, data, {}, store.suite)
    frames, without = [], []
    for state in states.values():
        if state["state"] != DONE or state["job"]["kind"] not in kinds:
            continue
        job = decode_job(state["job"])
        rows = KINDS[job.kind].rows(job, state["folder"], context)
        if rows is None:
            without.append(f"{job.label} ({state['folder']})")
            continue
        head = {"suite": store.suite, "run_id": store.run_id, "job_key": job.key, "kind": job.kind,
                **{k: job.tags.get(k) for k in JOB_COLUMNS[4:]}}
        head["defect_type"] = head["defect_type"] or ALL  # a model's job covers the whole test part
        frames.append(pd.DataFrame([{**head, **row} for row in rows]))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(JOB_COLUMNS))
    table.attrs["without_rows"] = without
    return table


def export_per_image(suite: str, run: str | None = None, results: Path | None = None, out: Path | None = None,
                     kinds: tuple[str, ...] = PER_IMAGE_KINDS) -> tuple[list[dict], Path, list[str]]:
    """`load_per_image`'s rows written per job as `<kind>_<job label>_<key>.csv` and `.jsonl` (pandas reads both
    as they are) under `out` (default results/exports/SUITE/RUN_ID). Returns a summary per kind, the folder, and the
    jobs without rows."""
    from harness.io import atomic_write_text
    from harness.runner.store import results_root

    table = load_per_image(suite, run, results, kinds)
    run_id = table["run_id"].iloc[0] if len(table) else find_run(suite, run, results).run_id
    out = Path(out) if out else results_root(results) / "exports" / suite / run_id
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict] = {}
    for key, rows in (table.groupby("job_key", sort=False) if len(table) else []):
        first = rows.iloc[0]
        own = JOB_COLUMNS + (SCORE_COLUMNS if first["kind"] == "score" else MAP_COLUMNS)
        rows = rows[[c for c in own if c in rows]].reset_index(drop=True).convert_dtypes()  # 1, not 1.0
        stem = "_".join(str(first.get(c, "")) for c in ("kind", "method", "category", "defect_type"))
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{stem}_f{first['fold']}_s{first['seed']}_{key[:8]}")
        atomic_write_text(out / f"{stem}.csv", rows.to_csv(index=False))
        atomic_write_text(out / f"{stem}.jsonl", rows.to_json(orient="records", lines=True) + "\n")
        entry = summary.setdefault(first["kind"], {"kind": first["kind"], "jobs": 0, "rows": 0})
        entry["jobs"] += 1
        entry["rows"] += len(rows)
    return list(summary.values()), out, table.attrs["without_rows"]
