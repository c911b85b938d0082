"""Benchmark: cached IC-LPIPS against the brute-force pairwise version, same inputs, one run.

500 generated images (DRAEM and CutPaste on the synthetic washer, 128 px) and 7 centres (the clean-thirds
training part of a defect type with 21 images), VGG LPIPS at 256 px as the published code. Target: the cached
version at least 20x faster, same value (1e-5). The brute-force half takes hours on 2 CPUs; set
DEFECTBENCH_BENCH_N (e.g. 100) for a quicker, smaller run.
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

    start = time.perf_counter()
    cached = ic_lpips(net, generated, centres, config, progress=True)
    cached_seconds = time.perf_counter() - start
    start = time.perf_counter()
    brute = ic_lpips_bruteforce(net, generated, centres, config, progress=True)
    brute_seconds = time.perf_counter() - start

    ratio = brute_seconds / cached_seconds
    print(f"\nIC-LPIPS on {len(generated)} generated images, {len(centres)} centres, VGG at 256 px "
          f"(trunk {net.trunk.describe()}):")
    print(f"  cached features : {cached_seconds:9.1f} s   IC-LPIPS = {cached.value:.8f}   clusters {cached.cluster_sizes}")
    print(f"  brute force     : {brute_seconds:9.1f} s   IC-LPIPS = {brute.value:.8f}")
    print(f"  speed-up        : {ratio:9.1f}x  (target >= 20x)   |difference| = {abs(cached.value - brute.value):.2e}")
    assert abs(cached.value - brute.value) < 1e-5
    assert ratio >= 20
