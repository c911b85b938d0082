"""Leaderboard tables: ranking on displayed values, ties, averages, failed and reported cells."""
from __future__ import annotations

import pandas as pd

from harness.report.render import tex_escape
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
