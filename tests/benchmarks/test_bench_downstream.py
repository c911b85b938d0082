"""Benchmark: the time of one downstream U-Net training and of one run of each anomalib detector per category,
tiny profile, on the smoke suite's synthetic categories (default synthetic set: 90 normal training images,
128 px). The U-Net trains on the category's real training anomalies in place of generated ones (the timing does not
depend on where the defects come from). Each time is also printed relative to PaDiM in the same run (one feature
pass over the normal images and a Gaussian fit: the cheapest detector), so runs on other machines compare.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from tabulate import tabulate

from harness.data.layouts import read_category
from harness.data.splits import make_split
from harness.data.synth import SynthConfig, cached
from harness.downstream import data, detectors, segmentation
from harness.downstream.config import model_config
from harness.profiles import get_profile

from . import record

pytestmark = pytest.mark.bench
CATEGORIES = ("weave", "washer", "tray")


def _timed(function):
    start = time.perf_counter()
    out = function()
    return time.perf_counter() - start, out


def test_downstream_and_detector_times_per_category(tmp_path):
    torch.set_num_threads(1)  # as a job runs in the suite (1 CPU each)
    resolution = get_profile("tiny").resolution
    root = cached(SynthConfig())
    rows, seconds_of = [], {}
    for name in CATEGORIES:
        split = make_split(read_category(root, name, dataset="synthetic"))
        test = data.test_set(split, resolution)
        normal = data.normal_set(split, "train", resolution)
        generated = data.from_samples([s for p in split.defects.values() for s in p.train], resolution)
        train, validation = data.hold_out(generated, 0.2, 0)
        config = model_config("segmentation", "tiny")
        seconds, (maps, _, _) = _timed(lambda: segmentation.run(normal, data.normal_set(split, "validation", resolution),
                                                                train, validation, test, config, 0))
        times = {"U-Net": seconds}
        for detector in detectors.DETECTORS:
            seconds, (maps, scores, _) = _timed(lambda: detectors.run(
                detector, normal, test, model_config(detector, "tiny"), resolution, "tiny", 0, tmp_path / name / detector))
            assert np.isfinite(maps).all() and np.isfinite(scores).all()
            times[detectors.DETECTORS[detector].label] = seconds
        rows.append([name, *(f"{t:.1f} s ({t / times['PaDiM']:.1f}x)" for t in times.values())])
        seconds_of[name] = times
    print(f"\nTiny profile, 1 thread, {len(normal)} normal training images at {resolution} px "
          f"(time, and x PaDiM in the same run):")
    print(tabulate(rows, headers=["category", *times], tablefmt="github"))
    models = list(times)

    def spread(model: str) -> str:
        values = [t[model] for t in seconds_of.values()]
        ratios = [t[model] / t["PaDiM"] for t in seconds_of.values()]
        return f"{model} {record.span(values)} s ({record.span(ratios)}x)"

    record.write(
        "downstream",
        what=(f"one downstream U-Net training and one run of each detector per smoke category (tiny profile, 1 thread, "
              f"{len(normal)} normal training images at {resolution} px)"),
        baseline=f"PaDiM {record.span([t['PaDiM'] for t in seconds_of.values()])} s",
        result=", ".join(spread(m) for m in models if m != "PaDiM"),
        target="printed, no target",
        measured=seconds_of)
