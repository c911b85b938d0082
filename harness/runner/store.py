"""The result store: results/runs/<suite>/<run_id>/{manifest.json, jobs/<job_key>/{status.json, records.jsonl, ...}}.

A job runs in its own folder and writes `records.jsonl` and then `status.json` last, each atomically; a folder
without a `done` status is the leftover of a killed or failed attempt and is redone. Finished jobs are found
by key in every run of the suite, so a changed suite reuses what it still shares with earlier runs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from harness.io import atomic_write_json, read_jsonl
from harness.paths import RESULTS_DIR

STATUS_FILE = "status.json"
RECORDS_FILE = "records.jsonl"
DONE, FAILED = "done", "failed"


def results_root(results: Path | None = None) -> Path:
    """results/, or a --results folder, or $DEFECTBENCH_RESULTS."""
    return Path(results or os.environ.get("DEFECTBENCH_RESULTS") or RESULTS_DIR)


def runs_root(results: Path | None = None) -> Path:
    return results_root(results) / "runs"


def read_status(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_status(folder: Path, status: dict) -> None:
    atomic_write_json(folder / STATUS_FILE, status)


def read_records(folder: Path) -> list[dict]:
    path = folder / RECORDS_FILE
    return read_jsonl(path) if path.is_file() else []


@dataclass
class RunStore:
    root: Path  # results/runs
    suite: str
    run_id: str

    @property
    def suite_dir(self) -> Path:
        return self.root / self.suite

    @property
    def run_dir(self) -> Path:
        return self.suite_dir / self.run_id

    @property
    def manifest_path(self) -> Path:
        return self.run_dir / "manifest.json"

    def job_dir(self, key: str) -> Path:
        return self.run_dir / "jobs" / key

    def finished(self) -> dict[str, Path]:
        """key -> folder of every finished job in any run of this suite (this run's copy first)."""
        found: dict[str, Path] = {}
        runs = sorted(p for p in self.suite_dir.iterdir() if p.is_dir()) if self.suite_dir.is_dir() else []
        runs.sort(key=lambda p: p != self.run_dir)
        for run in runs:
            jobs = run / "jobs"
            if not jobs.is_dir():
                continue
            for folder in jobs.iterdir():
                if folder.name not in found and (read_status(folder) or {}).get("state") == DONE:
                    found[folder.name] = folder
        return found

    def read_manifest(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return None

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest)


def latest_run(suite: str, results: Path | None = None) -> RunStore | None:
    """The run of `suite` whose manifest was updated last."""
    suite_dir = runs_root(results) / suite
    manifests = sorted(suite_dir.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime) if suite_dir.is_dir() else []
    if not manifests:
        return None
    return RunStore(runs_root(results), suite, manifests[-1].parent.name)
