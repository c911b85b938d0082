"""Benchmark: DualAnoDiff's cost in the tiny profile (its working size, one thread, as one Ray job), on the shipped
tiny backbone. Per defect type of washer, with BCM (the default) and without: fit time, generation time per image,
the peak resident memory of the process during the fit and the generation (sampled every 0.1 s), the part masks found.

Times are printed in seconds and relative to the first fit of the same run, and written as the README's row to
results/bench/cpu-dualanodiff.json (tests/benchmarks/record.py). Set DEFECTBENCH_BENCH_THREADS to change the thread
count (default 1).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from tabulate import tabulate

from harness.data.layouts import read_category
from harness.data.splits import make_split
from harness.data.synth import SynthConfig, cached
from harness.diffusion import provision
from harness.generation import fit_method
from harness.io import cached_file_hash
from harness.methods import load_method
from harness.tasks import build_request, build_task

from . import record
from .memory import peak_memory

pytestmark = pytest.mark.bench
N = 12  # the smoke suite's images per defect type


def test_dualanodiff_cost_per_defect_type(tmp_path):
    torch.set_num_threads(int(os.environ.get("DEFECTBENCH_BENCH_THREADS", "1")))
    root = cached(SynthConfig())
    split = make_split(read_category(root, "washer", dataset="synthetic"))
    paths = tuple(s.image for s in split.normal_train)
    normals = [provision.NormalImages("washer", paths, tuple(cached_file_hash(p) for p in paths))]
    folder, _ = provision.provision("tiny", normals)
    first_fit = None
    rows = []
    for label, settings in (("dualanodiff", {}), ("dualanodiff bcm: false", {"bcm": {"enabled": False}})):
        for defect in sorted(split.defects):
            method = load_method("dualanodiff", "tiny", settings)
            task = build_task(split, [defect], method.working_resolution(128), seed=0)
            task.backbone = folder
            work = tmp_path / label.replace(" ", "_") / defect
            with peak_memory() as fit_peak:
                fit = fit_method(method, task, work)
                first_fit = first_fit or fit
            request = build_request(task, method, defect, N, seed=0)
            with peak_memory() as generate_peak:
                begin = time.perf_counter()
                samples = list(method.generate(request, work))
                per_image = (time.perf_counter() - begin) / N
            rows.append([label, defect, round(fit, 1), round(fit / first_fit, 3), round(per_image, 2),
                         round(fit_peak[0]), round(generate_peak[0]),
                         sum(not s.extra["part_empty"] for s in samples), round(float(np.mean(
                             [s.mask.mean() for s in samples])), 3)])
    headers = ["method", "defect", "fit s", "fit / first fit", "s per image", "fit peak MB", "generation peak MB",
               f"non-empty masks of {N}", "mask area"]
    print()
    print(tabulate(rows, headers=headers))
    bcm = [r for r in rows if r[0] == "dualanodiff"]
    plain = [r for r in rows if r[0] != "dualanodiff"]
    ratio = sum(r[2] for r in plain) / sum(r[2] for r in bcm)
    record.write(
        "dualanodiff", what="DualAnoDiff per defect type of washer (tiny, its 64-px working size, "
                            f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}, the shipped backbone), with BCM (the default) and "
                            "without: fit, generation per image, peak resident memory, part masks found",
        baseline="the first fit",
        result=(f"fit {record.span([r[2] for r in bcm])} s with BCM, {record.span([r[2] for r in plain])} s without "
                f"({ratio:.2f}x); {record.span([r[4] for r in bcm], 2)} s per image with BCM, "
                f"{record.span([r[4] for r in plain], 2)} s without; peak {record.span([r[5] / 1024 for r in rows], 2)} GB; "
                f"{record.span([r[7] for r in rows], 0)} of {N} parts non-empty, mask area {record.span([r[8] for r in rows], 3)}"),
        target="printed, no target",
        measured={"threads": torch.get_num_threads(), "rows": [dict(zip(headers, row)) for row in rows]})
    assert all(row[2] > 0 for row in rows)
