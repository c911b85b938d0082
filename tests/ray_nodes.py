"""Ray nodes that a test starts and stops itself, leaving every other Ray on the machine alone.

`ray stop --force` stops every Ray process of the machine, a user's running suite included. These nodes get their
own temporary folder and port, and are stopped by their own process ids: the processes that name the folder or the
head's port on their command line, and everything those started (workers and agents rename themselves)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Nodes:
    folder: str  # the head's temporary folder
    port: int  # the head's port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def processes(self) -> list[psutil.Process]:
        return processes(self.folder, self.port)


@contextmanager
def ray_nodes(count: int = 1, cpus: int = 1, env: dict | None = None) -> Iterator[Nodes]:
    """A head and `count - 1` worker nodes on 127.0.0.1, each with `cpus` CPUs; stops exactly these nodes'
    processes afterwards."""
    port = free_port()
    folder = tempfile.mkdtemp(prefix="dbray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--disable-usage-stats"]
    try:
        _start(["--head", f"--port={port}", f"--temp-dir={folder}", "--include-dashboard=false", *common], env)
        for _ in range(count - 1):
            _start([f"--address=127.0.0.1:{port}", *common], env)
        yield Nodes(folder, port)
    finally:
        stop(processes(folder, port))
        shutil.rmtree(folder, ignore_errors=True)


def _start(arguments: list[str], env: dict) -> None:
    subprocess.run([RAY, "start", *arguments], env=env, check=True, capture_output=True, timeout=120)


def processes(folder: str, port: int) -> list[psutil.Process]:
    """The processes of the nodes whose head has this temporary folder and port, with their descendants."""
    def ours(process: psutil.Process) -> bool:
        try:
            return any(folder in arg or arg.endswith(f":{port}") for arg in process.cmdline())
        except psutil.Error:
            return False

    found: dict[int, psutil.Process] = {}
    for root in (p for p in psutil.process_iter() if p.pid != os.getpid() and ours(p)):
        for process in [root, *_descendants(root)]:
            found[process.pid] = process
    return list(found.values())


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


CORE = ("gcs_server", "raylet")  # what a Ray node is while it lives (helper processes may come and go)


def alive(found: list[psutil.Process]) -> bool:
    """Whether the node processes among these (GCS server, raylets) all still run."""
    core = [p for p in found if _name(p) in CORE]
    return bool(core) and all(_running(p) for p in core)


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop(found: list[psutil.Process], grace: float = 3.0) -> None:
    for process in found:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, survivors = psutil.wait_procs(found, timeout=grace)
    for process in survivors:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(survivors, timeout=grace)
