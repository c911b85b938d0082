"""Benchmark: the shipped tiny backbone against the per-run backbone every run pretrained before it (PretrainConfig's
defaults on the five synthetic categories' normals), per category (harness/diffusion/quality.py):

- autoencoder PSNR on held-out normals (target >= 32 dB);
- clean-latent error at t = 10 / 100 / 300 on held-out normal latents, below a per-category linear 5x5 denoiser's;
- KID of 64 samples from pure noise against the category's normals, at least 2x lower than the per-run backbone's;
  and the share of samples a nearest-centroid classifier assigns to the prompted category.

Writes results/bench/backbone.json (or $DEFECTBENCH_BENCH_OUT) and prints the table. Set DEFECTBENCH_BENCH_THREADS
to change the thread count (default 2). The per-run backbone is pretrained first if results/cache has none (~10 min).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tabulate import tabulate

from harness.diffusion import measure, quality, shipped
from harness.io import atomic_write_json

pytestmark = pytest.mark.bench


def test_the_shipped_backbone_against_the_per_run_one():
    torch.set_num_threads(int(os.environ.get("DEFECTBENCH_BENCH_THREADS", "2")))
    result = measure.measure_folder(shipped.SHIPPED, baseline=True, write=False)
    out = Path(os.environ.get("DEFECTBENCH_BENCH_OUT", "results/bench/backbone.json"))
    atomic_write_json(out, {"benchmark": "backbone", **result})
    rows = []
    for category, m in result["backbone"].items():
        old = result["per_run"][category]
        errors = m["clean_latent_error"]
        for scale, drawn in m["samples"].items():
            then = old["samples"][scale]
            rows.append([category, m["autoencoder_psnr"], *(errors[t]["unet"] for t in errors),
                         *(errors[t]["linear"] for t in errors), scale, drawn["kid"]["value"], then["kid"]["value"],
                         then["kid"]["value"] / drawn["kid"]["value"] if drawn["kid"]["value"] > 0 else float("nan"),
                         drawn["recognised"], then["recognised"]])
    print()
    print(tabulate(rows, headers=["category", "AE PSNR", "err t10", "t100", "t300", "linear t10", "t100", "t300",
                                  "guidance", "KID", "KID per-run", "ratio", "recognised", "per-run"], floatfmt=".3f"))
    print(f"written: {out}")
    print(json.dumps({"seconds": result["seconds"]}))
    for row in rows:
        assert row[1] >= 32, row
        assert all(unet < linear for unet, linear in zip(row[2:5], row[5:8])), row
        if float(row[8]) == quality.GUIDANCE[0]:  # KID at SD's pipeline default guidance: at least 2x lower
            assert row[10] >= 2 * row[9], row  # (a KID <= 0, indistinguishable from the reals, has no ratio)
