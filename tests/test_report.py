"""Leaderboard tables: ranking on displayed values, ties, averages, failed and reported cells."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from harness.report.render import tex_escape
from harness.report.reported import check_averages, load_reported
from harness.report.tables import FAILED, Coverage, build_table


def records(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"category": c, "method": m, "metric": k, "value": v, "random_weights": False}
                         for c, m, k, v in rows])


def test_best_bold_second_underlined_by_direction():
    frame = records([("a", "x", "fid", 10.0), ("a", "y", "fid", 20.0), ("a", "z", "fid", 30.0),
                     ("a", "x", "ic_lpips", 0.1), ("a", "y", "ic_lpips", 0.3), ("a", "z", "ic_lpips", 0.2)])
    table = build_table("t", frame, {}, ["fid", "ic_lpips"], ["x", "y", "z"], ["a"])
    assert [table.cell("a", m, "fid").rank for m in "xyz"] == [1, 2, None]  # lower is better
    assert [table.cell("a", m, "ic_lpips").rank for m in "xyz"] == [None, 1, 2]  # higher is better


def test_ties_on_displayed_values_share_a_mark_and_all_ties_get_none():
    frame = records([("a", "x", "fid", 10.001), ("a", "y", "fid", 10.002), ("a", "z", "fid", 12.0),
                     ("a", "x", "bg_psnr", 100.0), ("a", "y", "bg_psnr", 100.0), ("a", "z", "bg_psnr", 100.0)])
    table = build_table("t", frame, {}, ["fid", "bg_psnr"], ["x", "y", "z"], ["a"])
    assert [table.cell("a", m, "fid").rank for m in "xyz"] == [1, 1, 2]  # 10.00 and 10.00 tie as shown
    assert [table.cell("a", m, "bg_psnr").rank for m in "xyz"] == [None, None, None]


def test_average_row_counts_categories_and_failed_cells_are_marked():
    frame = records([("a", "x", "fid", 10.0), ("b", "x", "fid", 20.0), ("a", "y", "fid", 5.0)])
    table = build_table("t", frame, {("b", "y"): Coverage(1, 1)}, ["fid"], ["x", "y"], ["a", "b"])
    assert table.cell("Average", "x", "fid").value == 15.0
    assert table.cell("b", "y", "fid").state == FAILED
    assert any("y" in note and "1 of 2" in note for note in table.notes)


def test_reported_numbers_are_shown_but_not_ranked():
    frame = records([("a", "x", "fid", 10.0), ("a", "y", "fid", 20.0)])
    reported = pd.DataFrame([{"category": "a", "method": "x", "metric": "fid", "value": 1.0}])
    table = build_table("t", frame, {}, ["fid"], ["x", "y"], ["a"], reported=reported)
    assert table.cell("a", "x (reported)", "fid").value == 1.0
    assert table.cell("a", "x (reported)", "fid").rank is None
    assert table.cell("a", "x", "fid").rank == 1


def test_tex_escape_does_not_escape_its_own_replacements():
    assert tex_escape(r"ic_lpips \ {x} 5% ~") == r"ic\_lpips \textbackslash{} \{x\} 5\% \textasciitilde{}"


# ---- the papers' own tables ---------------------------------------------------------------------------------

REPORTED = Path(__file__).resolve().parents[1] / "results" / "reported"


def test_shipped_tables_are_the_transcriptions():
    shared = Path(__file__).resolve().parents[2] / "shared" / "reported"
    if not shared.is_dir():
        pytest.skip("../shared/reported not found")
    for path in sorted(shared.glob("*.yaml")):
        assert (REPORTED / path.name).read_bytes() == path.read_bytes(), path.name


def test_printed_averages_are_checked_against_their_rows():
    checks = check_averages(load_reported(REPORTED))
    checkable = [c for c in checks if c.checkable]
    # the transcription's own count (shared/reported/README.md): 43 of 138 differ, 30 beyond rounding
    assert (len(checkable), sum(c.differs for c in checks), sum(c.beyond_rounding for c in checks)) == (138, 43, 30)
    table3 = next(c for c in checks if c.source.endswith("Table 3") and c.method == "dualanodiff"
                  and c.metric == "accuracy")
    assert table3.printed == 72.26 and round(table3.mean, 2) == 77.43 and table3.beyond_rounding
    rounding = next(c for c in checks if "AnomalyXFusion" in c.source and c.source.endswith("Table 1")
                    and c.method == "anomalyxfusion" and c.metric == "ic_lpips")
    assert rounding.differs and not rounding.beyond_rounding  # 0.33 printed, rows 0.3247
    assert not next(c for c in checks if c.source.endswith("Table 5") and c.method == "dualanodiff_without_bcm").checkable


def test_a_wrong_printed_average_is_caught_and_precision_is_kept(tmp_path):
    """Negative control: change one printed average by two units of its last digit; the check must see it."""
    text = (REPORTED / "dualanodiff-table1.yaml").read_text()
    assert "average: {is: 1.90," in text
    (tmp_path / "t.yaml").write_text(text.replace("average: {is: 1.90,", "average: {is: 1.92,"))
    checks = {(c.method, c.metric): c for c in check_averages(load_reported(tmp_path))}
    assert checks[("dualanodiff", "is")].beyond_rounding and checks[("dualanodiff", "is")].decimals == 2
    assert not {(m, k) for (m, k), c in checks.items() if c.beyond_rounding} - {("dualanodiff", "is")}


def test_reported_average_is_shown_beside_the_mean_of_its_rows():
    from harness.report.render import markdown_table
    from harness.report.reported import CATEGORIES, table_rows

    categories = list(CATEGORIES["mvtec_ad"])
    measured = records([(c, "croppaste", "accuracy", 0.5) for c in categories if c != "toothbrush"])
    extra, sources = table_rows(load_reported(REPORTED), "mvtec_ad", categories, ["accuracy"])
    table = build_table("t", measured, {}, ["accuracy"], ["croppaste"], categories, extra)
    text = markdown_table(table, False)
    average = next(line for line in text.splitlines() if line.startswith("| **Average**"))
    assert "72.3<sup>≠</sup> (rows: 77.4)" in average  # DualAnoDiff Table 3's own average and its rows
    assert any("DualAnoDiff" in s for s in sources)
    subset, _ = table_rows(load_reported(REPORTED), "mvtec_ad", ["bottle", "cable"], ["accuracy"])
    assert "average" not in set(subset["category"])  # a printed 14-category average is not shown for 2 categories


def test_values_from_samples_a_stand_in_made_are_marked_and_explained():
    """A sample partly made by a stand-in (GeneratedSample.stand_in) is counted in the score and downstream records
    (`stand_in`), and every cell and average it feeds carries ‡ with a note saying what the stand-in made."""
    from harness.data.samples import stand_in_summary
    from harness.report.render import LATEX, MARKDOWN, _cell_text

    rows = [{"stand_in": None}, {"stand_in": "mask: the stand-in segmenter's"}, {"stand_in": "mask: the stand-in segmenter's"}]
    assert stand_in_summary(rows) == "2 of 3 samples: mask: the stand-in segmenter's"
    assert stand_in_summary([{"stand_in": None}, {}]) is None
    frame = records([("a", "x", "fid", 10.0), ("b", "x", "fid", 20.0), ("a", "y", "fid", 5.0)])
    frame["stand_in"] = [stand_in_summary(rows), None, None]
    table = build_table("t", frame, {}, ["fid"], ["x", "y"], ["a", "b"])
    assert table.cell("a", "x", "fid").stand_in and table.cell("Average", "x", "fid").stand_in
    assert not table.cell("b", "x", "fid").stand_in and not table.cell("a", "y", "fid").stand_in
    assert table.stand_ins == {"2 of 3 samples: mask: the stand-in segmenter's": "x, a"}
    assert _cell_text(table, "a", "x", "fid", False, MARKDOWN) == "<u>10.00<sup>‡</sup></u>"  # second of two
    assert r"\textsuperscript{\ddag}" in _cell_text(table, "a", "x", "fid", False, LATEX)
    assert "‡" not in _cell_text(table, "b", "x", "fid", False, MARKDOWN)


def test_two_seeds_give_mean_and_spread_as_pandas_computes_them():
    """Per cell: each seed's mean over defect types, then their mean and sample std; the Average: each seed's mean
    over the categories, then their mean and std. Checked against pandas on the same records."""
    import numpy as np

    from harness.report.render import latex_table, markdown_table

    rng = np.random.default_rng(0)
    rows = [{"category": c, "method": m, "metric": "ic_lpips", "defect_type": d, "fold": 0, "seed": s,
             "value": float(rng.uniform(0.2, 0.5)), "random_weights": False}
            for c in ("a", "b") for m in ("x", "y") for d in ("d1", "d2", "d3") for s in (0, 1)]
    rows = [r for r in rows if not (r["category"] == "b" and r["defect_type"] == "d3" and r["seed"] == 1)]
    frame = pd.DataFrame(rows)
    table = build_table("t", frame, {}, ["ic_lpips"], ["x", "y"], ["a", "b"])
    per_seed = frame.groupby(["category", "method", "seed"])["value"].mean()  # b, seed 1: over two defect types
    for (category, method), seeds in per_seed.groupby(level=[0, 1]):
        cell = table.cell(category, method, "ic_lpips")
        assert cell.value == pytest.approx(seeds.mean()) and cell.std == pytest.approx(seeds.std())
    category_means = per_seed.groupby(level=["method", "seed"]).mean()
    for method, seeds in category_means.groupby(level=0):
        average = table.cell("Average", method, "ic_lpips")
        assert average.value == pytest.approx(seeds.mean()) and average.std == pytest.approx(seeds.std())
    assert table.spread == 2 and any("± the standard deviation" in n for n in table.notes)
    x = table.cell("a", "x", "ic_lpips")
    shown = f"{x.value:.3f} ± {x.std:.3f}"
    assert shown in markdown_table(table, False)
    assert shown.replace(" ± ", r" $\pm$ ") in latex_table(table, "c", "l", False)


def test_one_seed_shows_no_spread_and_ranks_on_the_displayed_means():
    frame = pd.DataFrame([{"category": "a", "method": m, "metric": "fid", "fold": 0, "seed": s, "value": v,
                           "random_weights": False}
                          for m, s, v in (("x", 0, 10.0), ("x", 1, 10.004), ("y", 0, 10.001), ("y", 1, 10.003),
                                          ("z", 0, 12.0))])
    table = build_table("t", frame, {}, ["fid"], ["x", "y", "z"], ["a"])
    assert table.cell("a", "x", "fid").rank == table.cell("a", "y", "fid").rank == 1  # 10.00 ± ... both
    assert "n=1" in markdown_table_text(table)
    single = build_table("t", frame[frame["seed"] == 0], {}, ["fid"], ["x", "y", "z"], ["a"])
    assert single.spread == 0 and "±" not in markdown_table_text(single)


def markdown_table_text(table) -> str:
    from harness.report.render import markdown_table

    return markdown_table(table, False)
