"""make bench-gpu (tests/benchmarks/paper_gpu.py): it runs, and the README's table is rendered from what it wrote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks import paper_gpu

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_table_is_rendered_from_the_benchmarks_json():
    out = REPO / paper_gpu.OUT
    data = json.loads(out.read_text()) if out.is_file() else None
    assert paper_gpu.readme_block((REPO / "README.md").read_text()) == paper_gpu.render(data)


@pytest.mark.slow  # 142 s on 2 cores (two methods' paper profiles at rehearsal widths): make test-slow
def test_the_script_measures_each_method_at_its_paper_settings_on_the_rehearsal_models(tmp_path):
    """On a CPU at the rehearsal widths with the steps cut (a GPU runs the papers' widths and step counts): the two
    methods with an auxiliary network (and AnomalyDiffusion's mask draws), so that a GPU's run does not meet them
    first."""
    out = tmp_path / "paper_gpu.json"
    assert paper_gpu.main(["--methods", "anomalyxfusion", "anomalydiffusion", "--widths", "rehearsal",
                           "--fit-steps", "1", "3", "--inference-steps", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    fusion, diffusion = data["rows"]
    assert (fusion["method"], fusion["backbone"], fusion["resolution"], fusion["batch"], fusion["paper_fit_steps"],
            fusion["scheduler"], fusion["generation_batch"], fusion["auxiliary"], fusion["auxiliary_steps"]) == (
        "anomalyxfusion", "ldm-text2im-large-256", 256, 4, 4167, "DDIMScheduler", 8, "ISTR auto-encoder", 2000)
    assert (diffusion["method"], diffusion["auxiliary"], diffusion["auxiliary_steps"]) == (
        "anomalydiffusion", "mask generator", 30001)
    for row in data["rows"]:  # a difference of two CPU timings may be noise: then the row says so, with no estimate
        noisy = row["timing_noise"] or {}
        assert all(value <= 0 for value in noisy.values())
        assert ("fit step" in noisy) == (row["seconds_per_fit_step"] is None) and ("image" in noisy) == (
            row["seconds_per_image"] is None)
        assert ("auxiliary step" in noisy) == (row["auxiliary_seconds_per_step"] is None)
        assert (not {"fit step", "auxiliary step"} & set(noisy)) == (row["paper_fit_minutes"] is not None)
        assert all(row[k] is None or row[k] > 0 for k in ("seconds_per_fit_step", "seconds_per_image",
                                                           "auxiliary_seconds_per_step", "paper_fit_minutes"))
        assert row["fit_peak_gib"] > 0 and row["generation_peak_gib"] > 0
    assert diffusion["mask_seconds_per_draw"] > 0 and fusion["mask_seconds_per_draw"] is None
    assert data["widths"] == "rehearsal" and data["device"].startswith("cpu")
    table = paper_gpu.render(data)
    # (a difference of timings at or below zero is said in its row, checked above; no method may be missing)
    assert "| anomalyxfusion " in table and "rehearsal widths" in table
    assert "not measured (the run stopped)" not in table
    data["rows"][0] = {**fusion, "timing_noise": {"auxiliary step": -0.01}, "auxiliary_seconds_per_step": None,
                       "paper_fit_minutes": None}  # noise is said, not estimated from
    assert "not measured: timing noise" in paper_gpu.render(data) and "anomalyxfusion (auxiliary step -0.01 s)" in (
        paper_gpu.render(data))
    data["rows"].pop()  # a run cut short says so
    assert "not measured (the run stopped): anomalydiffusion" in paper_gpu.render(data)
