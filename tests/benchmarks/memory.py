"""The peak resident memory of this process while a block runs (the benchmarks' memory figures)."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def peak_memory() -> Iterator[list[float]]:
    """Samples the process's resident memory every 0.1 s while the block runs; yields [peak MB] (filled after)."""
    samples, done = [_rss_mb()], threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            samples.append(_rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result: list[float] = []
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result.append(max(samples))
