"""Benchmark: background_aware in the tiny profile on this machine, as the smoke suite runs it (1 CPU per job,
128 px, the default synthetic set): the backbone's pretraining on the normal images of weave, washer and tray,
then per defect type of weave the fit and the generation of 12 images, and the process's peak memory. Times are
also printed relative to the pretraining in the same run, so runs on other machines compare.
"""
from __future__ import annotations

import resource
import time

import pytest
import torch
from tabulate import tabulate

from harness.data.layouts import read_category
from harness.data.splits import make_split
from harness.data.synth import SynthConfig, cached
from harness.diffusion import provision
from harness.generation import fit_method, generate_to
from harness.io import cached_file_hash
from harness.methods import load_method
from harness.profiles import get_profile
from harness.tasks import build_task

pytestmark = pytest.mark.bench
CATEGORIES = ("weave", "washer", "tray")
N = 12


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def test_background_aware_times_and_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFECTBENCH_CACHE", str(tmp_path / "cache"))  # pretrain now, not from an earlier cache
    torch.set_num_threads(1)
    resolution = get_profile("tiny").resolution
    root = cached(SynthConfig())
    splits = {name: make_split(read_category(root, name, dataset="synthetic")) for name in CATEGORIES}
    normals = [provision.NormalImages(name, tuple(s.image for s in split.normal_train),
                                      tuple(cached_file_hash(s.image) for s in split.normal_train))
               for name, split in splits.items()]
    start = time.perf_counter()
    backbone, info = provision.provision("tiny", normals, progress=True)
    pretrain = time.perf_counter() - start
    rows = [["pretrain backbone", f"{sum(len(n.paths) for n in normals)} normal images", pretrain, 1.0, _peak_gb()]]
    split = splits["weave"]
    for defect in split.category.defect_types:
        method = load_method("background_aware", "tiny")
        task = build_task(split, [defect], resolution, 0)
        task.backbone = backbone
        fit = fit_method(method, task, tmp_path / defect / "work")
        rows.append([f"fit weave/{defect}", f"{len(task.anomalies)} anomalies, {method.config['steps']} steps",
                     fit, fit / pretrain, _peak_gb()])
        start = time.perf_counter()
        generate_to(method, task, defect, N, 0, tmp_path / defect / "samples", tmp_path / defect / "work", progress=True)
        per_image = (time.perf_counter() - start) / N
        rows.append([f"generate weave/{defect}", "per image", per_image, per_image / pretrain, _peak_gb()])
    print()
    print(tabulate(rows, headers=["step", "what", "seconds", "x pretraining", "peak memory (GB)"], floatfmt=".3f"))
    assert all(row[2] > 0 for row in rows)
