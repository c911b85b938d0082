"""Benchmark: the smoke suite with the Ray executor and with the serial executor, in one run.

Both start from empty result folders and a warm data/weights cache. Each job runs with the threads it declares in
either executor, so the ratio shows what running jobs side by side buys. Target on 2 CPUs: Ray <= 0.65x serial.
"""
from __future__ import annotations

import time

import pytest

from harness.runner.run import run_suite
from harness.runner.suite import load_suite
from tests.benchmarks import record

pytestmark = pytest.mark.bench


def test_smoke_suite_ray_vs_serial(tmp_path):
    suite = load_suite("smoke")
    from harness.runner.plan import expand, prepare

    expand(prepare(suite))  # warm the synthetic data set and the random-weight files before timing
    timings = {}
    for executor in ("serial", "ray"):
        start = time.perf_counter()
        result = run_suite(suite, executor=executor, num_cpus=2, results=tmp_path / executor, progress=False)
        timings[executor] = time.perf_counter() - start
        assert not result.failed
    ratio = timings["ray"] / timings["serial"]
    print(f"\nsmoke suite ({len(result.states)} jobs): serial {timings['serial']:.1f} s, Ray {timings['ray']:.1f} s, "
          f"Ray / serial = {ratio:.2f} (target <= 0.65)")
    record.write("runner", what=f"the smoke suite ({len(result.states)} jobs) on Ray vs the serial executor",
                 baseline=f"serial {timings['serial']:.0f} s", result=f"Ray {timings['ray']:.0f} s, **{ratio:.2f}x**",
                 target="≤ 0.65x", measured={"jobs": len(result.states), "seconds": timings, "ratio": ratio})
    assert ratio <= 0.65
