"""Executors: Ray (one machine or a cluster) and serial (for debugging). Both run `execute_job`.

Each job runs with as many torch threads as the CPUs it declares, in either executor, so both give the same
numbers. Jobs exchange files in the run folder, never images through Ray's object store.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

from harness.errors import DefectBenchError
from harness.io import NO_SPACE, no_space, write_jsonl
from harness.runner.kind import ANNOUNCE_FILE, Job, JobContext
from harness.runner.kinds import KINDS, decode_job
from harness.runner.store import (DONE, FAILED, RECORDS_FILE, SKIPPED, now, outputs_digest, pin_outputs, read_status,
                                  record_processes, write_status)

_PROCESS_CACHE: dict[str, Any] = {}  # per worker process: networks and splits built once
# Settings of the driver that workers on every node must share.
PASSED_ENV = ("DEFECTBENCH_CACHE", "DEFECTBENCH_RESULTS", "DEFECTBENCH_METHODS_PATH", "DEFECTBENCH_DEVICE",
              "DEFECTBENCH_OFFLINE", "DEFECTBENCH_LPIPS_MEMORY_GB", "TORCH_HOME", "HF_HOME")


def execute_job(job_dict: dict, folder: str, deps: dict[str, str], common: dict) -> dict:
    """Run one job in `folder` (emptied first); records.jsonl then status.json are written last, atomically."""
    import torch
    from threadpoolctl import threadpool_limits

    job = decode_job(job_dict)
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
        with threadpool_limits(limits=job_threads), kept_warnings() as status["warnings"]:
            context = JobContext(path, {k: Path(v) for k, v in deps.items()}, _PROCESS_CACHE, job.label)
            records = KINDS[job.kind].run(job.params, job.where, context) or []
        finished = now()
        write_jsonl(path / RECORDS_FILE, [{**common, **job.tags, "job_key": job.key, "kind": job.kind,
                                           "device": status["device"], **r, "started": started, "finished": finished}
                                          for r in records])
        status.update(state=DONE, finished=finished, seconds=round(time.perf_counter() - clock, 3), records=len(records),
                      outputs=pin_outputs(path))
    except (Exception, SystemExit) as err:  # one failing job is recorded and does not stop the others
        if isinstance(err, OSError) and err.errno in NO_SPACE:  # not the job's failure: the run stops, kept so far
            shutil.rmtree(path, ignore_errors=True)
            raise no_space(err.filename or path) from None
        status.update(state=FAILED, finished=now(), seconds=round(time.perf_counter() - clock, 3),
                      error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    finally:
        torch.set_num_threads(threads)
    # the driver may have stopped this job at its time limit and recorded that (Ray's forced cancel raises
    # SystemExit here, which would otherwise be written over the timeout): the driver's word stands
    write_status(path, status, replace=False)
    return status


@contextlib.contextmanager
def kept_warnings(limit: int = 50) -> Iterator[list[str]]:
    """The warnings a job shows (the filters as they are), kept for its status, as a Ray worker's console does not
    reach the driver's: each message once, at most `limit`; still shown as usual."""
    kept: list[str] = []
    show = warnings.showwarning

    def keep(message, category, *args, **kwargs):
        line = f"{category.__name__}: {message}"
        if line not in kept and len(kept) < limit:
            kept.append(line)
        show(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.showwarning = keep
        yield kept


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


def chain_heights(jobs: list[Job]) -> dict[str, float]:
    """Each job's weight plus the heaviest chain of jobs that depend on it (JobKind.weight)."""
    children: dict[str, list[str]] = {j.key: [] for j in jobs}
    for job in jobs:
        for dep in job.deps:
            if dep in children:
                children[dep].append(job.key)
    weight = {j.key: KINDS[j.kind].weight for j in jobs}
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


def lost_status(job: Job, folder: Path, error: str) -> dict:
    """Record a job that ended without writing its status (its process died, or it ran past its time limit) as
    failed, with the reason, unless it did finish after all."""
    status = {"state": FAILED, "key": job.key, "kind": job.kind, "label": job.label, "error": error,
              "finished": now()}
    folder.mkdir(parents=True, exist_ok=True)
    if (read_status(folder) or {}).get("state") == DONE:
        return read_status(folder)
    write_status(folder, status)
    return status


def _timed_out(job: Job, limit: float) -> str:
    return (f"TimeoutError: ran past its time limit of {limit:g} s and was stopped (executor.timeouts.{job.kind} "
            f"in the suite; default {KINDS[job.kind].timeout:g} s)")


def serve(fd: int) -> None:
    """The serial executor's worker process (python -m harness.runner.worker FD): runs the jobs it is sent over the
    socket `fd`, one after another, and ends with the driver (PR_SET_PDEATHSIG) or when the driver closes it."""
    import ctypes
    import signal
    from multiprocessing.connection import Connection

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    connection = Connection(fd)
    while True:
        try:
            arguments = connection.recv()
        except EOFError:  # the driver is gone, or done
            return
        try:
            connection.send(("status", execute_job(*arguments)))
        except BaseException as err:  # the status could not be written (a full disk): the driver raises it
            connection.send(("error", (type(err).__name__, str(err), isinstance(err, DefectBenchError))))


class JobProcess:
    """One process that runs the serial executor's jobs: started once and reused (it keeps the networks it built,
    as a Ray worker does), replaced when a job ends it (os._exit, a crash, the OOM killer) or runs past its time
    limit. A job thus cannot end the run, serial as on Ray. It sees the driver's environment, not its other state
    (as a Ray worker). Costs a process start (importing torch) per run, and per job lost."""

    def __init__(self):
        self.process = None
        self.connection = None

    def _start(self) -> None:
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        # a fresh interpreter, as a Ray worker (safe with CUDA; the driver's script is not run again, as
        # multiprocessing's spawn would), in a session of its own so that stopping it stops what its job started
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-m", "harness.runner.worker", str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), start_new_session=True)
        theirs.close()
        self.connection = Connection(ours.detach())

    def run(self, job: Job, arguments: tuple, folder: Path, limit: float) -> dict:
        if self.process is None or self.process.poll() is not None:
            self._start()
        self.connection.send(arguments)
        deadline = time.monotonic() + limit
        while not self.connection.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
            if self.process.poll() is not None and not self.connection.poll():
                return lost_status(job, folder, self._death())
            if time.monotonic() >= deadline:
                self.stop()
                return lost_status(job, folder, _timed_out(job, limit))
        try:
            kind, value = self.connection.recv()
        except (EOFError, ConnectionResetError):
            return lost_status(job, folder, self._death())
        if kind == "error":
            name, message, ours = value
            raise DefectBenchError(message) if ours else RuntimeError(f"{name}: {message}")
        return value

    def _death(self) -> str:
        import signal
        import subprocess

        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        code = self.process.returncode
        self.process = None
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return (f"WorkerDied: the job's process ended before the job finished ({how}: os._exit, a crash, or the "
                f"out-of-memory killer)")

    def stop(self, wait: float = 0.0) -> None:
        """End the worker: let it leave on its own within `wait` seconds (its job done), else end it and everything
        its job started (its own process group)."""
        import signal
        import subprocess

        if self.process is None:
            return
        self.connection.close()  # the worker's next recv ends its loop
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(wait)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        self.process = None


def run_serial(scheduler: Scheduler, common: dict, progress: Progress, timeout: Callable[[str], float]) -> None:
    worker = JobProcess()
    try:
        for job in scheduler.pending():
            if scheduler.blocked(job):
                scheduler.state[job.key] = SKIPPED
                progress.skipped()
                continue
            progress.started()
            folder = scheduler.job_dir(job.key)
            status = worker.run(job, (job.as_dict(), str(folder), scheduler.deps_of(job), common), folder,
                                timeout(job.kind))
            scheduler.record(job, status)
            progress.finished(status["state"])
    finally:
        worker.stop(wait=10)


def run_ray(scheduler: Scheduler, common: dict, progress: Progress, num_cpus: int | None, address: str | None,
            max_retries: int, timeout: Callable[[str], float] = lambda kind: KINDS[kind].timeout,
            processes: Path | None = None) -> None:
    """`processes`: where the processes of a local Ray instance started here are written down (store.RunLock), so
    that the next run ends those a killed driver left behind."""
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
    noted = started_here and not address and processes is not None
    next_note = time.monotonic()
    remote = ray.remote(execute_job)
    running: dict[Any, Job] = {}
    deadlines: dict[Any, float] = {}  # when each running job's time is up
    announced: dict[str, int] = {}  # lines of JobContext.announce printed so far, per job
    waiting = scheduler.pending()
    try:
        while waiting or running:
            if noted and time.monotonic() >= next_note:  # Ray starts its agents and workers as it goes
                record_processes(processes)
                next_note = time.monotonic() + 5
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
                    deadlines[ref] = time.monotonic() + timeout(job.kind)
                    progress.started()
            if not running:
                continue
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for job in running.values():
                _relay_announcements(job, scheduler.job_dir(job.key), progress, announced)
            for ref in [r for r in running if r not in done and time.monotonic() > deadlines[r]]:
                job = running.pop(ref)
                ray.cancel(ref, force=True)  # ends its worker process
                status = lost_status(job, scheduler.job_dir(job.key), _timed_out(job, timeout(job.kind)))
                scheduler.record(job, status)
                progress.finished(status["state"])
            for ref in done:
                job = running.pop(ref)
                try:
                    status = ray.get(ref)
                except Exception as err:  # the worker died more often than max_retries allows
                    status = lost_status(job, scheduler.job_dir(job.key), f"{type(err).__name__}: {err}")
                scheduler.record(job, status)
                progress.finished(status["state"])
    finally:
        if started_here:
            ray.shutdown()
        if noted:
            processes.unlink(missing_ok=True)
