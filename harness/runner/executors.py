"""Executors: Ray (one machine or a cluster) and serial (for debugging). Both run `execute_job`.

Each job runs with as many torch threads as the CPUs it declares, in either executor, so both give the same
numbers. Jobs exchange files in the run folder, never images through Ray's object store.
"""
from __future__ import annotations

import os
import platform
import shutil
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from harness.io import write_jsonl
from harness.runner.jobs import ANNOUNCE_FILE, JOB_KINDS, Job, JobContext
from harness.runner.store import (DONE, FAILED, RECORDS_FILE, SKIPPED, outputs_digest, pin_outputs, read_status,
                                  write_status)

_PROCESS_CACHE: dict[str, Any] = {}  # per worker process: networks and splits built once
# Settings of the driver that workers on every node must share.
PASSED_ENV = ("DEFECTBENCH_CACHE", "DEFECTBENCH_RESULTS", "DEFECTBENCH_METHODS_PATH", "DEFECTBENCH_DEVICE",
              "DEFECTBENCH_OFFLINE", "DEFECTBENCH_LPIPS_MEMORY_GB", "TORCH_HOME", "HF_HOME")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def execute_job(job_dict: dict, folder: str, deps: dict[str, str], common: dict) -> dict:
    """Run one job in `folder` (emptied first); records.jsonl then status.json are written last, atomically."""
    import torch
    from threadpoolctl import threadpool_limits

    from harness.runner.registry import load_job_kinds

    load_job_kinds()  # in a fresh worker process the kinds are not registered yet
    job = Job.from_dict(job_dict)
    path = Path(folder)
    if path.exists():
        shutil.rmtree(path)  # what a killed or failed attempt left
    path.mkdir(parents=True)
    threads, job_threads = torch.get_num_threads(), max(1, int(job.resources.get("num_cpus", 1)))
    torch.set_num_threads(job_threads)
    started, clock = now(), time.perf_counter()
    status = {"key": job.key, "kind": job.kind, "label": job.label, "host": platform.node(), "pid": os.getpid(),
              "node": _ray_node(), "device": describe_device(), "started": started,
              "inputs": {key: outputs_digest(Path(dep)) for key, dep in deps.items()}}
    try:
        # BLAS threads too: numpy/scipy linear algebra (FID) rounds differently with another thread count, and the
        # serial and Ray executors must give identical numbers
        with threadpool_limits(limits=job_threads):
            records = JOB_KINDS[job.kind](job, JobContext(path, {k: Path(v) for k, v in deps.items()},
                                                          _PROCESS_CACHE)) or []
        finished = now()
        write_jsonl(path / RECORDS_FILE, [{**common, **job.tags, "job_key": job.key, "kind": job.kind,
                                           "device": status["device"], **r, "started": started, "finished": finished}
                                          for r in records])
        status.update(state=DONE, finished=finished, seconds=round(time.perf_counter() - clock, 3), records=len(records),
                      outputs=pin_outputs(path))
    except (Exception, SystemExit) as err:  # one failing job is recorded and does not stop the others (a method
        # calling sys.exit included: the serial executor runs it in this very process)
        status.update(state=FAILED, finished=now(), seconds=round(time.perf_counter() - clock, 3),
                      error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    finally:
        torch.set_num_threads(threads)
    write_status(path, status)
    return status


def describe_device() -> str:
    """The device this job's networks run on (harness.device), with the GPU's name."""
    from harness.device import default_device

    device = default_device()
    if device.type == "cuda":
        import torch

        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _cluster(ray: Any) -> dict[str, float]:
    try:
        resources = ray.cluster_resources()
        return {"CPU": float(resources.get("CPU", 1)), "GPU": float(resources.get("GPU", 0))}
    except Exception:
        return {"CPU": 1.0, "GPU": 0.0}


def ray_options(job: Job, cluster: dict[str, float], max_retries: int) -> dict:
    """What a job asks Ray for: its CPUs (at most the cluster's, so that a 2-CPU job still runs on a 1-CPU
    cluster), and its share of a GPU where the cluster has GPUs. Ray hides the GPUs from a task that asks for none,
    so a job that may use a GPU must ask for its share to see one."""
    options = {"num_cpus": min(float(job.resources.get("num_cpus", 1)), max(cluster["CPU"], 1.0)),
               "max_retries": max_retries,
               "num_gpus": job.resources.get("num_gpus", 0) if cluster["GPU"] > 0 else 0}
    if job.resources.get("memory"):
        options["memory"] = job.resources["memory"]
    return options


def _fits(job: Job, running: Any, cluster: dict[str, float]) -> bool:
    """Hand Ray only what the cluster can run now, so that 'running' on the bar means running, not queued.

    The cluster's resources are read every round, so nodes that join (or an autoscaler) are used."""
    if not running:
        return True
    cpus = sum(float(j.resources.get("num_cpus", 1)) for j in running) + float(job.resources.get("num_cpus", 1))
    if cluster["GPU"] <= 0:
        return cpus <= cluster["CPU"]
    gpus = sum(float(j.resources.get("num_gpus", 0)) for j in running) + float(job.resources.get("num_gpus", 0))
    return cpus <= cluster["CPU"] and gpus <= cluster["GPU"] + 1e-9


def _relay_announcements(job: Job, folder: Path, progress: "Progress", printed: dict[str, int]) -> None:
    """Print the lines a running Ray job announced (JobContext.announce) that were not printed yet; `printed`
    counts them per job for this run (a job redone in a later run starts afresh)."""
    path = folder / ANNOUNCE_FILE
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines[printed.get(job.key, 0):]:
        progress.note(f"{job.label}: {line}")
    printed[job.key] = len(lines)


def _ray_node() -> str | None:
    """The Ray node a job runs on (None outside Ray)."""
    ray = sys.modules.get("ray")  # never import Ray just to ask
    try:
        return ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else None
    except Exception:
        return None


class Progress:
    """A bar over jobs: done / running / failed / skipped, elapsed time and an estimate."""

    def __init__(self, total: int, already_done: int, enabled: bool = True):
        self.counts = {"done": already_done, "running": 0, "failed": 0, "skipped": 0}
        self.bar = tqdm(total=total, initial=already_done, desc="jobs", unit="job", disable=not enabled,
                        dynamic_ncols=True)
        self._refresh()

    def _refresh(self) -> None:
        self.bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in self.counts.items()), refresh=True)

    def started(self) -> None:
        self.counts["running"] += 1
        self._refresh()

    def finished(self, state: str) -> None:
        self.counts["running"] -= 1
        self.counts["done" if state == DONE else "failed"] += 1
        self.bar.update(1)
        self._refresh()

    def note(self, line: str) -> None:
        """A line above the bar (it stays when the bar moves on)."""
        self.bar.write(line)

    def skipped(self) -> None:
        self.counts["skipped"] += 1
        self.bar.update(1)
        self._refresh()

    def close(self) -> None:
        self.bar.close()


# rough relative costs of one job of a kind, for ordering only (never shown, never a result)
KIND_WEIGHTS = {"backbone": 10.0, "fit": 2.0, "generate": 1.0, "score": 1.0, "segment": 2.0, "classify": 2.0,
                "detect": 3.0}


def chain_heights(jobs: list[Job]) -> dict[str, float]:
    """Each job's weight plus the heaviest chain of jobs that depend on it (KIND_WEIGHTS)."""
    children: dict[str, list[str]] = {j.key: [] for j in jobs}
    for job in jobs:
        for dep in job.deps:
            if dep in children:
                children[dep].append(job.key)
    weight = {j.key: KIND_WEIGHTS.get(j.kind, 1.0) for j in jobs}
    heights: dict[str, float] = {}

    def height(key: str) -> float:
        if key not in heights:
            heights[key] = weight[key] + max((height(c) for c in children[key]), default=0.0)
        return heights[key]

    for job in jobs:
        height(job.key)
    return heights


class Scheduler:
    """Dependency bookkeeping shared by the executors: which jobs are ready, which must be skipped."""

    def __init__(self, jobs: list[Job], finished: dict[str, Path], job_dir: Callable[[str], Path]):
        self.jobs = jobs
        self.location: dict[str, Path] = dict(finished)  # key -> folder of a done job
        self.state: dict[str, str] = {j.key: DONE for j in jobs if j.key in finished}
        self.job_dir = job_dir

    def pending(self) -> list[Job]:
        """The jobs not finished yet, those that head the longest chains of work first (critical-path order), so
        that the long diffusion chain (backbone -> fit -> generate -> score -> downstream) starts before the short
        independent jobs that can fill the other workers meanwhile."""
        heights = chain_heights(self.jobs)
        return sorted((j for j in self.jobs if j.key not in self.state), key=lambda j: -heights[j.key])

    def ready(self, job: Job) -> bool:
        return all(self.state.get(d) == DONE for d in job.deps)

    def blocked(self, job: Job) -> bool:
        return any(self.state.get(d) in (FAILED, SKIPPED) for d in job.deps)

    def deps_of(self, job: Job) -> dict[str, str]:
        return {d: str(self.location[d]) for d in job.deps}

    def record(self, job: Job, status: dict) -> None:
        self.state[job.key] = status["state"]
        if status["state"] == DONE:
            self.location[job.key] = self.job_dir(job.key)


def run_serial(scheduler: Scheduler, common: dict, progress: Progress) -> None:
    for job in scheduler.pending():
        if scheduler.blocked(job):
            scheduler.state[job.key] = SKIPPED
            progress.skipped()
            continue
        progress.started()
        status = execute_job(job.as_dict(), str(scheduler.job_dir(job.key)), scheduler.deps_of(job), common)
        scheduler.record(job, status)
        progress.finished(status["state"])


def run_ray(scheduler: Scheduler, common: dict, progress: Progress, num_cpus: int | None, address: str | None,
            max_retries: int) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance needs no token
    started_here = not ray.is_initialized()
    if started_here:
        runtime_env = {"env_vars": {k: os.environ[k] for k in PASSED_ENV if k in os.environ}}
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level="error")
        else:
            # "local": a new instance of its own, never one found on the machine (RAY_ADDRESS, `ray start`)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                     log_to_driver=False, logging_level="error")
    remote = ray.remote(execute_job)
    running: dict[Any, Job] = {}
    announced: dict[str, int] = {}  # lines of JobContext.announce printed so far, per job
    waiting = scheduler.pending()
    try:
        while waiting or running:
            cluster = _cluster(ray)
            for job in list(waiting):
                if scheduler.blocked(job):
                    waiting.remove(job)
                    scheduler.state[job.key] = SKIPPED
                    progress.skipped()
                elif scheduler.ready(job) and _fits(job, list(running.values()), cluster):
                    waiting.remove(job)
                    ref = remote.options(**ray_options(job, cluster, max_retries)).remote(job.as_dict(), str(scheduler.job_dir(job.key)),
                                                           scheduler.deps_of(job), common)
                    running[ref] = job
                    progress.started()
            if not running:
                continue
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for job in running.values():
                _relay_announcements(job, scheduler.job_dir(job.key), progress, announced)
            for ref in done:
                job = running.pop(ref)
                try:
                    status = ray.get(ref)
                except Exception as err:  # the worker died more often than max_retries allows
                    status = {"state": FAILED, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
                    folder = scheduler.job_dir(job.key)
                    folder.mkdir(parents=True, exist_ok=True)
                    if (read_status(folder) or {}).get("state") != DONE:
                        write_status(folder, {**status, "key": job.key, "label": job.label, "finished": now()})
                scheduler.record(job, status)
                progress.finished(status["state"])
    finally:
        if started_here:
            ray.shutdown()
