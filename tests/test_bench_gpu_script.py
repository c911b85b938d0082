"""make bench-gpu (tests/benchmarks/paper_gpu.py): it runs, and the README's table is rendered from what it wrote."""
from __future__ import annotations

import json
from pathlib import Path

from tests.benchmarks import paper_gpu

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_table_is_rendered_from_the_benchmarks_json():
    out = REPO / paper_gpu.OUT
    data = json.loads(out.read_text()) if out.is_file() else None
    assert paper_gpu.readme_block((REPO / "README.md").read_text()) == paper_gpu.render(data)


def test_the_script_measures_a_method_at_its_paper_settings_on_the_rehearsal_models(tmp_path):
    """On a CPU at the rehearsal widths with the steps cut (a GPU runs the papers' widths and step counts)."""
    out = tmp_path / "paper_gpu.json"
    assert paper_gpu.main(["--methods", "anomalyxfusion", "--widths", "rehearsal", "--fit-steps", "1", "2",
                           "--inference-steps", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert (row["method"], row["backbone"], row["resolution"], row["batch"], row["paper_fit_steps"],
            row["scheduler"], row["generation_batch"]) == ("anomalyxfusion", "ldm-text2im-large-256", 256, 4, 4167,
                                                            "DDIMScheduler", 8)
    assert row["fit_peak_gib"] > 0 and row["generation_peak_gib"] > 0 and row["paper_fit_minutes"] is not None
    assert data["widths"] == "rehearsal" and data["device"].startswith("cpu")
    table = paper_gpu.render(data)
    assert "| anomalyxfusion " in table and "rehearsal widths" in table
