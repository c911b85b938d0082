"""Benchmark: cached IC-LPIPS against the brute-force pairwise version, same inputs, one run.

500 generated images (DRAEM and CutPaste on the synthetic washer, 128 px) and 7 centres (the clean-thirds
training part of a defect type with 21 images), VGG LPIPS at 256 px as the published code. Target: the cached
version at least 20x faster, same value (1e-5). The brute-force half takes hours on 2 CPUs; set
DEFECTBENCH_BENCH_N (e.g. 100) for a quicker, smaller run.

Both wall time and process CPU time are printed; the target is checked on CPU time, which other work on the
machine during the long brute-force half does not inflate.
"""
from __future__ import annotations

import os
import time

import pytest

from harness.data import read_category
from harness.data.splits import make_split
from harness.data.synth import SynthConfig, synthesize
from harness.generation import fit_method, generate_to
from harness.methods import load_method
from harness.metrics.iclpips import ICLPIPSConfig, ic_lpips, ic_lpips_bruteforce
from harness.metrics.lpips_net import LPIPSNet
from harness.tasks import build_task
from tests.benchmarks import record

pytestmark = pytest.mark.bench


def test_cached_ic_lpips_vs_bruteforce(tmp_path):
    n = int(os.environ.get("DEFECTBENCH_BENCH_N", "500"))
    root = synthesize(tmp_path / "data", SynthConfig(seed=0, categories=("washer",), n_train=100, n_defect=21))
    split = make_split(read_category(root, "washer"))
    generated = []
    for name in ("draem", "cutpaste"):
        method = load_method(name)
        task = build_task(split, ["crack"], 128, 0)
        fit_method(method, task, tmp_path / f"{name}-fit")
        out = generate_to(method, task, "crack", n // 2, 0, tmp_path / name, tmp_path / f"{name}-fit", progress=False)
        generated += sorted((out / "images").glob("*.png"))
    centres = [s.image for s in split.defects["crack"].centres]
    assert len(centres) == 7
    net, config = LPIPSNet("vgg"), ICLPIPSConfig()

    (cached, cached_wall, cached_cpu) = _timed(ic_lpips, net, generated, centres, config, progress=True)
    (brute, brute_wall, brute_cpu) = _timed(ic_lpips_bruteforce, net, generated, centres, config, progress=True)

    ratio = brute_cpu / cached_cpu
    print(f"\nIC-LPIPS on {len(generated)} generated images, {len(centres)} centres, VGG at 256 px "
          f"(trunk {net.trunk.describe()}):")
    print(f"  cached features : {cached_wall:9.1f} s wall {cached_cpu:9.1f} s CPU   IC-LPIPS = {cached.value:.8f}"
          f"   clusters {cached.cluster_sizes}")
    print(f"  brute force     : {brute_wall:9.1f} s wall {brute_cpu:9.1f} s CPU   IC-LPIPS = {brute.value:.8f}")
    print(f"  speed-up        : {ratio:9.1f}x CPU, {brute_wall / cached_wall:.1f}x wall  (target >= 20x)"
          f"   |difference| = {abs(cached.value - brute.value):.2e}")
    difference = abs(cached.value - brute.value)
    record.write("iclpips", what=f"IC-LPIPS on {len(generated)} generated images and {len(centres)} centres (VGG, "
                                 "256 px), cached features vs one LPIPS forward per pair",
                 baseline=f"brute force {brute_cpu:,.0f} s CPU ({brute_wall:,.0f} s wall)",
                 result=f"cached {cached_cpu:,.0f} s CPU ({cached_wall:,.0f} s wall): **{ratio:.1f}x** CPU, "
                        f"{brute_wall / cached_wall:.1f}x wall; same value (\\|Δ\\| = {difference:.1e})",
                 target="≥ 20x, same value",
                 measured={"cached": {"wall": cached_wall, "cpu": cached_cpu, "value": cached.value},
                           "brute_force": {"wall": brute_wall, "cpu": brute_cpu, "value": brute.value}})
    assert difference < 1e-5
    assert ratio >= 20


def _timed(function, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu
