"""Leaderboard tables in the papers' shape: rows are categories plus an Average, columns are method x metric.

A cell is the mean over defect types (and folds and seeds) of one category; the Average row is the mean of the
category rows that exist, with how many went in (a published average was once wrong because a row was
missing). With several seeds or folds, a cell is the mean over those runs of each run's mean over defect types,
shown with the sample standard deviation over the runs (`0.412 ± 0.013`); the Average's spread is that of each
run's mean over the categories (runs every category has), not a pooled one. In each row, per metric, the best
method is bold and the second best underlined (direction from its MetricSpec), judged on the values as displayed,
so ties share a mark; numbers reported by papers are shown but not ranked.

Every cell knows how many values were planned for it (one per job of the run that feeds it) and how many it got.
A cell, and every average it feeds, that covers fewer values than planned says so (`0.062 f 2/3`: 2 of 3 values,
the others failed; `2/3` alone: not computed, e.g. a stopped run or a metric that had too few inputs) and is not
ranked. Missing cells are '—'; cells whose jobs all failed are '—' marked as failed.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from harness.metrics.specs import direction, format_value

MISSING, FAILED = "missing", "failed"


@dataclass
class Cell:
    value: float | None = None
    state: str = MISSING  # "ok" | "missing" | "failed"
    random: bool = False  # computed with random-weight feature extractors
    count: int = 0  # how many values (defect types x folds x seeds) went into the mean
    rank: int | None = None  # 1 = best, 2 = second best in its row and metric
    reported: bool = False  # a number the paper reports, not one measured here
    planned: int = 0  # how many values the run planned for it (0: unknown, taken as count)
    failed: int = 0  # of the planned values, how many come from jobs that failed (or were skipped for a failure)
    not_run: int = 0  # of the planned values, how many come from jobs that have not run (a stopped run)
    small: bool = False  # computed from fewer reference images than the metric's documented minimum
    stand_in: bool = False  # some samples behind it were partly made by a stand-in (records' `stand_in`)
    printed_average: float | None = None  # reported Average rows: the paper's printed value, beside our mean
    printed_tolerance: float = 0.0  # how far the printed average may lie from the mean of the rows by rounding
    replicates: dict[tuple, float] = field(default_factory=dict)  # (fold, seed) -> that run's mean over defect types

    @property
    def std(self) -> float | None:
        """The sample standard deviation (n - 1) over the replicates; None with fewer than two."""
        values = list(self.replicates.values())
        if len(values) < 2:
            return None
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    @property
    def incomplete(self) -> bool:
        return self.state == "ok" and not self.reported and self.count < self.planned

    @property
    def differs_beyond_rounding(self) -> bool:
        return (self.printed_average is not None and self.state == "ok"
                and abs(self.printed_average - self.value) > self.printed_tolerance * (1 + 1e-9))


@dataclass(frozen=True)
class Coverage:
    """How many jobs should feed a (category, method) cell, and how many of them failed."""

    planned: int
    failed: int = 0
    not_run: int = 0  # jobs with no status: the run was stopped before they ran


@dataclass
class Table:
    title: str
    metrics: list[str]
    methods: list[str]
    rows: list[str]  # categories, then "Average"
    cells: dict[tuple[str, str, str], Cell]  # (row, method, metric)
    notes: list[str] = field(default_factory=list)
    average_counts: dict[str, int] = field(default_factory=dict)  # method -> categories in its average
    missing_reasons: dict[str, str] = field(default_factory=dict)  # why a value could not be computed -> an example
    stand_ins: dict[str, str] = field(default_factory=dict)  # what a stand-in made -> "method, category"

    def cell(self, row: str, method: str, metric: str) -> Cell:
        return self.cells.get((row, method, metric), Cell())

    @property
    def spread(self) -> int:
        """How many runs (seeds x folds) most measured cells are the mean of, when some cell has more than one
        (their standard deviation is shown); 0 when every cell comes from one run."""
        counts = Counter(len(c.replicates) for c in self.cells.values()
                         if c.state == "ok" and not c.reported and c.replicates)
        return counts.most_common(1)[0][0] if counts and max(counts) > 1 else 0


def build_table(title: str, records: pd.DataFrame, coverage: dict[tuple[str, str], Coverage], metrics: list[str],
                methods: list[str], categories: list[str], reported: pd.DataFrame | None = None) -> Table:
    """`records`: rows with category, method, metric, value, random_weights (and optionally `missing`, why a value
    is absent, and `below_minimum`). `coverage`: (category, method) -> the jobs planned to feed that cell and how
    many failed; a cell without an entry is planned as what it got. `reported`: optional rows (category, method,
    metric, value) from papers, shown as extra methods labelled '<method> (reported)'."""
    cells: dict[tuple[str, str, str], Cell] = {}
    subset = records[records["metric"].isin(metrics) & records["method"].isin(methods)] if not records.empty else records
    reasons: dict[str, str] = {}
    stand_ins: dict[str, str] = {}
    for (category, method, metric), group in (subset.groupby(["category", "method", "metric"]) if not subset.empty else []):
        finite = group[group["value"].map(lambda v: v is not None and not math.isnan(v))]
        for reason in group.get("missing", pd.Series(dtype=object)).dropna():
            reasons.setdefault(str(reason), f"{method}, {category}")
        if len(finite):
            small = bool(finite["below_minimum"].fillna(False).astype(bool).any()) if "below_minimum" in finite else False
            made = [str(s) for s in finite.get("stand_in", pd.Series(dtype=object)).dropna() if s]
            for summary in made:
                stand_ins.setdefault(summary, f"{method}, {category}")
            replicates = _replicate_means(finite)
            cells[(category, method, metric)] = Cell(sum(replicates.values()) / len(replicates), "ok",
                                                     bool(finite["random_weights"].fillna(False).any()), len(finite),
                                                     small=small, stand_in=bool(made), replicates=replicates)
    all_methods = list(methods)
    for category in categories:
        for method in methods:
            plan = coverage.get((category, method))
            for metric in metrics:
                cell = cells.setdefault((category, method, metric), Cell())
                cell.planned = max(plan.planned, cell.count) if plan else cell.count
                cell.failed = plan.failed if plan else 0
                cell.not_run = plan.not_run if plan else 0
                if cell.state != "ok" and cell.failed:
                    cell.state = FAILED
    if reported is not None and not reported.empty:
        all_methods += _reported_cells(cells, reported, metrics, methods)
    table = Table(title, metrics, all_methods, list(categories) + ["Average"], cells, missing_reasons=reasons,
                  stand_ins=stand_ins)
    _averages(table, categories)
    _rank(table)
    if table.spread:
        table.notes.append(f"Each cell: the mean ± the standard deviation (n - 1) over {table.spread} runs (seeds x "
                           "folds), each run's value the mean over its defect types; the Average: the mean of the "
                           "category cells, ± the spread of the runs' means over the categories, from the runs every "
                           "category has; n=k marks a spread from another number of runs.")
    return table


REPLICATE = ("fold", "seed")


def _replicate_means(values: pd.DataFrame) -> dict[tuple, float]:
    """(fold, seed) -> the mean of that run's values (over defect types); records without folds or seeds are one
    replicate. A cell's value is the mean of these, its spread their standard deviation."""
    keys = [k for k in REPLICATE if k in values]
    if not keys:
        return {(): float(values["value"].mean())}
    means = values.groupby([values[k].fillna(-1) for k in keys])["value"].mean()
    return {(key if isinstance(key, tuple) else (key,)): float(v) for key, v in means.items()}


def _reported_cells(cells: dict, reported: pd.DataFrame, metrics: list[str], methods: list[str]) -> list[str]:
    """Cells of the numbers a paper reports (a printed Average goes beside the mean of the printed rows)."""
    labels = []
    if "tolerance" not in reported:
        reported = reported.assign(tolerance=0.0)
    for row in reported.itertuples(index=False):
        category, method, metric, value = row.category, row.method, row.metric, row.value
        if metric not in metrics:
            continue
        label = f"{method} (reported)"
        if category == "average":
            average = cells.setdefault(("Average", label, metric), Cell(reported=True))
            average.printed_average, average.printed_tolerance = float(value), float(row.tolerance)
        else:
            cells[(category, label, metric)] = Cell(float(value), "ok", False, 1, reported=True, planned=1)
        if label not in labels and label not in methods:
            labels.append(label)
    return labels


def _averages(table: Table, categories: list[str]) -> None:
    for method in table.methods:
        for metric in table.metrics:
            present = [table.cell(c, method, metric) for c in categories]
            ok = [c for c in present if c.state == "ok"]
            average = table.cells.setdefault(("Average", method, metric), Cell(reported=method.endswith("(reported)")))
            if not ok:
                if any(c.state == FAILED for c in present):
                    average.state = FAILED
                average.not_run, average.planned = sum(c.not_run for c in present), sum(c.planned for c in present)
                continue
            average.value = sum(c.value for c in ok) / len(ok)
            # the spread over runs of the category mean: each replicate's mean over the categories that have it all
            shared = set.intersection(*(set(c.replicates) for c in ok))
            average.replicates = {r: sum(c.replicates[r] for c in ok) / len(ok) for r in sorted(shared)}
            average.state, average.random, average.small = "ok", any(c.random for c in ok), any(c.small for c in ok)
            average.stand_in = any(c.stand_in for c in ok)
            average.count = sum(c.count for c in present)
            average.planned = sum(max(c.planned, c.count) for c in present)
            average.failed = sum(c.failed for c in present)
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
            better = direction(metric)
            if better is None:
                continue
            cells = [table.cells[(row, m, metric)] for m in table.methods if table.cell(row, m, metric).state == "ok"
                     and not table.cell(row, m, metric).reported and not table.cell(row, m, metric).incomplete]
            shown = sorted({float(format_value(c.value, metric)) for c in cells}, reverse=better == "up")
            if len(shown) < 2:
                continue
            for cell in cells:
                place = shown.index(float(format_value(cell.value, metric))) + 1
                cell.rank = place if place <= 2 else None
