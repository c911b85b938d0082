"""Leaderboard tables in the papers' shape: rows are categories plus an Average, columns are method x metric.

A cell is the mean over defect types (and folds and seeds) of one category; the Average row is the mean of the
category rows that exist, with how many went in (a published average was once wrong because a row was
missing). In each row, per metric, the best method is bold and the second best underlined (direction from
`DIRECTION`), judged on the values as displayed, so ties share a mark; numbers reported
by papers are shown but not ranked. Missing cells are '—'; cells whose job failed are '—' marked as failed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from harness.metrics import detection
from harness.metrics.score import DIRECTION as GENERATION_DIRECTION
from harness.metrics.score import LABELS as GENERATION_LABELS

DIRECTION = {**GENERATION_DIRECTION, **detection.DIRECTION}
LABELS = {**GENERATION_LABELS, **detection.LABELS}
PERCENT = frozenset(detection.DIRECTION)  # detection metrics print as percentages, as the papers print them

MISSING, FAILED = "missing", "failed"


@dataclass
class Cell:
    value: float | None = None
    state: str = MISSING  # "ok" | "missing" | "failed"
    random: bool = False  # computed with random-weight feature extractors
    count: int = 0  # how many values (defect types x folds x seeds) went into the mean
    rank: int | None = None  # 1 = best, 2 = second best in its row and metric
    reported: bool = False  # a number the paper reports, not one measured here


@dataclass
class Table:
    title: str
    metrics: list[str]
    methods: list[str]
    rows: list[str]  # categories, then "Average"
    cells: dict[tuple[str, str, str], Cell]  # (row, method, metric)
    notes: list[str] = field(default_factory=list)
    average_counts: dict[str, int] = field(default_factory=dict)  # method -> categories in its average

    def cell(self, row: str, method: str, metric: str) -> Cell:
        return self.cells.get((row, method, metric), Cell())


def build_table(title: str, records: pd.DataFrame, failed: set[tuple[str, str]], metrics: list[str],
                methods: list[str], categories: list[str], reported: pd.DataFrame | None = None) -> Table:
    """`records`: rows with category, method, metric, value, random_weights. `failed`: (category, method) pairs
    with a failed job. `reported`: optional rows (category, method, metric, value) from papers, shown as extra
    methods labelled '<method> (reported)'."""
    cells: dict[tuple[str, str, str], Cell] = {}
    subset = records[records["metric"].isin(metrics) & records["method"].isin(methods)] if not records.empty else records
    for (category, method, metric), group in (subset.groupby(["category", "method", "metric"]) if not subset.empty else []):
        values = [v for v in group["value"] if v is not None and not math.isnan(v)]
        if values:
            cells[(category, method, metric)] = Cell(sum(values) / len(values), "ok",
                                                     bool(group["random_weights"].fillna(False).any()), len(values))
    all_methods = list(methods)
    if reported is not None and not reported.empty:
        for (category, method, metric), value in reported.set_index(["category", "method", "metric"])["value"].items():
            if metric in metrics:
                label = f"{method} (reported)"
                cells[(category, label, metric)] = Cell(float(value), "ok", False, 1, reported=True)
                if label not in all_methods:
                    all_methods.append(label)
    for category, method in failed:
        for metric in metrics:
            if (category, method, metric) not in cells:
                cells[(category, method, metric)] = Cell(state=FAILED)
    table = Table(title, metrics, all_methods, list(categories) + ["Average"], cells)
    _averages(table, categories)
    _rank(table)
    return table


def _averages(table: Table, categories: list[str]) -> None:
    for method in table.methods:
        for metric in table.metrics:
            present = [table.cell(c, method, metric) for c in categories]
            ok = [c for c in present if c.state == "ok"]
            if not ok:
                if any(c.state == FAILED for c in present):
                    table.cells[("Average", method, metric)] = Cell(state=FAILED)
                continue
            table.cells[("Average", method, metric)] = Cell(sum(c.value for c in ok) / len(ok), "ok",
                                                            any(c.random for c in ok), len(ok), None,
                                                            all(c.reported for c in ok))
            table.average_counts[method] = max(table.average_counts.get(method, 0), len(ok))
    incomplete = {m: n for m, n in table.average_counts.items() if n < len(categories)}
    if incomplete:
        table.notes.append("Average over fewer categories for: " +
                           ", ".join(f"{m} ({n} of {len(categories)})" for m, n in incomplete.items()) + ".")


def _rank(table: Table) -> None:
    """Dense ranking on the displayed values: ties share a mark; a row where every method ties gets none;
    reported numbers are not measured under this protocol and are left out."""
    for row in table.rows:
        for metric in table.metrics:
            direction = DIRECTION.get(metric)
            if direction is None:
                continue
            cells = [table.cells[(row, m, metric)] for m in table.methods
                     if table.cell(row, m, metric).state == "ok" and not table.cell(row, m, metric).reported]
            shown = sorted({float(format_value(c.value, metric)) for c in cells}, reverse=direction == "up")
            if len(shown) < 2:
                continue
            for cell in cells:
                place = shown.index(float(format_value(cell.value, metric))) + 1
                cell.rank = place if place <= 2 else None


def arrow(metric: str, latex: bool = False) -> str:
    direction = DIRECTION.get(metric)
    if direction is None:
        return ""
    if latex:
        return r"$\uparrow$" if direction == "up" else r"$\downarrow$"
    return "↑" if direction == "up" else "↓"


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def format_value(value: float, metric: str) -> str:
    if metric in PERCENT:
        return f"{100 * value:.1f}"
    if metric in ("bg_psnr", "fid"):
        return f"{value:.2f}"
    if metric == "kid":
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
    return f"{value:.3f}"
