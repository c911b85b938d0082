"""The result store: results/runs/<suite>/<run_id>/{manifest.json, jobs/<job_key>/{status.json, records.jsonl, ...}}.

A job runs in its own folder and writes `records.jsonl` and then `status.json` last, each atomically; a folder
without a `done` status is the leftover of a killed or failed attempt and is redone. Finished jobs are found
by key in every run of the suite, so a changed suite reuses what it still shares with earlier runs.

A `done` status pins what the job produced: the size, modification time and SHA-256 of every file in its folder
(`outputs`). A job whose folder no longer holds exactly that (a truncated or deleted records.jsonl, a deleted
sample) is not finished: `run` redoes it and every job that depends on it, and `leaderboard` and `export` refuse
to read from it and name the damaged file. Every file is hashed on every check (a bit flip or an edited digit keeps
the size and can keep the modification time), so what a downstream job, the leaderboard or an export reads is what
was written.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from harness.errors import DefectBenchError
from harness.io import atomic_write_json, read_jsonl, sha256_file, sha256_json
from harness.paths import RESULTS_DIR


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


STATUS_FILE = "status.json"
RECORDS_FILE = "records.jsonl"
PER_IMAGE_FILE = "per_image.jsonl"  # score jobs: one row per generated image (harness.results.load_per_image)
DONE, FAILED, SKIPPED = "done", "failed", "skipped"  # skipped: a job it needs failed


def results_root(results: Path | None = None) -> Path:
    """results/, or a --results folder, or $DEFECTBENCH_RESULTS."""
    return Path(results or os.environ.get("DEFECTBENCH_RESULTS") or RESULTS_DIR)


def runs_root(results: Path | None = None) -> Path:
    return results_root(results) / "runs"


class DamagedError(DefectBenchError):
    """A finished job's files, or a run's manifest, are not what was written."""


def read_status(folder: Path) -> dict | None:
    """The job's status, or None when there is none or it cannot be read (a damaged status is not finished)."""
    try:
        status = json.loads((folder / STATUS_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return status if isinstance(status, dict) else None


def status_problem(folder: Path) -> str | None:
    """Why the status file of a job folder cannot be read; None when it reads (or is simply absent)."""
    path = folder / STATUS_FILE
    if not path.is_file():
        return None
    try:
        return None if isinstance(json.loads(path.read_text()), dict) else f"{path}: not a JSON object"
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"{path}: unreadable ({err})"


def pin_outputs(folder: Path) -> dict[str, dict]:
    """Size, modification time and SHA-256 of every file a job wrote (all but its status), by relative path."""
    pins = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATUS_FILE):
        stat = path.stat()
        pins[path.relative_to(folder).as_posix()] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                                     "sha256": sha256_file(path)}
    return pins


def output_problem(folder: Path, status: dict) -> str | None:
    """Why a finished job's folder does not hold what its status pinned; None when it does."""
    pins = status.get("outputs")
    if not isinstance(pins, dict):
        return f"{folder / STATUS_FILE}: pins no outputs (written by an older DefectBench)"
    for relative, pin in pins.items():
        path = folder / relative
        try:
            stat = path.stat()
        except OSError:
            return f"{path}: missing (it was written when the job finished)"
        if stat.st_size != pin["size"]:
            return f"{path}: {stat.st_size} bytes, but the job wrote {pin['size']}"
        if sha256_file(path) != pin["sha256"]:  # every file, every time: an edit can keep size and mtime
            return f"{path}: content differs from what the job wrote"
    return None


def outputs_digest(folder: Path) -> str | None:
    """One hash of everything a finished job produced (the pins of its status); a job that depends on it records
    this, so that it is not reused once that dependency has been redone with other outputs."""
    status = read_status(folder)
    return sha256_json(status["outputs"]) if status and isinstance(status.get("outputs"), dict) else None


def finished_problem(folder: Path) -> str | None:
    """None when the folder holds a finished, intact job; else why not."""
    status = read_status(folder)
    if status is None:
        return status_problem(folder) or f"{folder / STATUS_FILE}: missing"
    if status.get("state") != DONE:
        return f"{folder / STATUS_FILE}: state {status.get('state')!r}"
    return output_problem(folder, status)


def write_status(folder: Path, status: dict, replace: bool = True) -> bool:
    return atomic_write_json(folder / STATUS_FILE, status, replace)


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

    def finished(self, keys: set[str] | None = None) -> dict[str, Path]:
        """key -> folder of every finished, intact job (of `keys`, or all) in any run of this suite (this run's
        copy first). A damaged copy is passed over, so the job is redone."""
        found: dict[str, Path] = {}
        runs = sorted(p for p in self.suite_dir.iterdir() if p.is_dir()) if self.suite_dir.is_dir() else []
        runs.sort(key=lambda p: p != self.run_dir)
        for run in runs:
            jobs = run / "jobs"
            if not jobs.is_dir():
                continue
            for folder in jobs.iterdir():
                key = folder.name
                if key not in found and (keys is None or key in keys) and finished_problem(folder) is None:
                    found[key] = folder
        return found

    def read_manifest(self) -> dict | None:
        """The run's manifest; None if there is none. A damaged one raises DamagedError naming it."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DamagedError(f"{self.manifest_path}: damaged ({err}); `defectbench run {self.suite}` rewrites it")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("jobs"), list):
            raise DamagedError(f"{self.manifest_path}: damaged (no job list); `defectbench run {self.suite}` rewrites it")
        return manifest

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest)


class BusyError(DefectBenchError):
    """Another process is running the same run folder."""


class RunLock:
    """One process per run folder at a time: an exclusive flock on results/runs/<suite>/.<run_id>.lock (outside the
    run folder, which --fresh deletes). The kernel drops the lock when its process ends however it ends, so a
    killed run leaves no stale lock; the file names the holder for the message the next run prints."""

    def __init__(self, store: "RunStore"):
        self.path = store.suite_dir / f".{store.run_id}.lock"
        self.processes = store.suite_dir / f".{store.run_id}.processes.json"  # what the run's local Ray started
        self.handle = None

    def __enter__(self) -> "RunLock":
        import fcntl
        import platform


        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise BusyError(f"{self.path.parent / self.path.name[1:-5]}: in use by {holder}; wait for that run to "
                            "finish (or stop it) before running the same suite again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {platform.node()} since {now()}\n")
        handle.flush()
        self.handle = handle
        end_leftovers(self.processes)  # a killed earlier run's Ray processes: nothing else holds the lock
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # closing releases the flock
            self.handle = None


def record_processes(path: Path) -> None:
    """Write down this process's descendants (pid and start time) to `path`: the local Ray instance a run started.
    Ray's agents outlive a driver killed with SIGKILL (they are re-parented to init); the next run ends them."""
    import psutil

    try:
        children = [(p.pid, p.create_time()) for p in psutil.Process().children(recursive=True)]
    except psutil.Error:
        return
    atomic_write_json(path, {"driver": os.getpid(), "processes": children})


def end_leftovers(path: Path) -> list[int]:
    """End the processes an earlier run wrote down (record_processes) that still run: each only if its start time
    is the one recorded, so that a pid the system has reused since is never touched. Returns the pids ended."""
    import psutil

    try:
        recorded = json.loads(path.read_text())["processes"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    ended = []
    for pid, started in recorded:
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - started) < 0.01:
                process.kill()
                ended.append(process)
        except psutil.Error:
            continue
    psutil.wait_procs(ended, timeout=5)
    path.unlink(missing_ok=True)
    return [p.pid for p in ended]


def latest_run(suite: str, results: Path | None = None) -> RunStore | None:
    """The run of `suite` whose manifest was updated last. A run folder whose manifest is gone is damaged (a run
    writes its manifest before its first job): an error, rather than quietly showing an older run."""
    suite_dir = runs_root(results) / suite
    runs = [p for p in suite_dir.iterdir() if p.is_dir()] if suite_dir.is_dir() else []
    for run in runs:
        if (run / "jobs").is_dir() and not (run / "manifest.json").is_file():
            raise DamagedError(f"{run / 'manifest.json'}: missing; `defectbench run {suite}` rewrites it")
    manifests = sorted((p / "manifest.json" for p in runs if (p / "manifest.json").is_file()),
                       key=lambda p: p.stat().st_mtime)
    if not manifests:
        return None
    return RunStore(runs_root(results), suite, manifests[-1].parent.name)
