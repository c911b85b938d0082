"""The console summary of a run: the headline metrics per method and category, and what failed."""
from __future__ import annotations

from collections import Counter

from tabulate import tabulate

from harness.downstream.data import ALL
from harness.metrics.specs import CLASSIFICATION, DETECTION, GENERATION, format_value, label, names
from harness.results import run_records
from harness.runner.run import RunResult
from harness.runner.store import DONE, FAILED, SKIPPED, read_status

MISSING = "—"


def _metric_table(frame, metrics: tuple[str, ...]):
    """Category x method rows, one column per metric of `metrics` recorded, each the mean as its MetricSpec prints
    it ('—' where none), or None where none of them was recorded."""
    metrics = [m for m in metrics if m in set(frame["metric"])]
    if not metrics:
        return None
    table = frame[frame["metric"].isin(metrics)].pivot_table(index=["category", "method"], columns="metric",
                                                             values="value", aggfunc="mean")
    metrics = [m for m in metrics if m in table.columns]  # a metric recorded but never computed has no column
    if not metrics:
        return None
    for metric in metrics:
        table[metric] = [MISSING if value != value else format_value(value, metric) for value in table[metric]]
    return table[metrics].rename(columns=label).reset_index()


def _downstream_summary(frame) -> list[str]:
    """Downstream models and detectors over the whole test part (their headline metrics, in %)."""
    table = _metric_table(frame[frame["defect_type"] == ALL],
                          names(DETECTION, headline=True) + names(CLASSIFICATION, headline=True))
    if table is None:
        return []
    return ["Downstream (segmentation U-Net / classifier on generated images) and detectors, whole test part, %:\n"
            + tabulate(table, headers="keys", tablefmt="simple", showindex=False, disable_numparse=True)]


def _scored(result: RunResult, category: str, method: str) -> str:
    jobs = [j for j in result.plan.jobs if j.kind == "score" and j.tags.get("category") == category
            and j.tags.get("method") == method]
    done = sum(result.states.get(j.key) == DONE for j in jobs)
    return f"{done}/{len(jobs)}" + ("" if done == len(jobs) else " !")


def summary(result: RunResult) -> str:
    """A table per method and category: the generation metrics (mean over defect types), the downstream models' and
    detectors' headline metrics, and job failures."""
    frame = run_records(result.store)
    lines = []
    if not frame.empty:
        table = _metric_table(frame, names(GENERATION))
        if table is not None:
            table["scored"] = [_scored(result, category, method) for category, method in zip(table["category"],
                                                                                              table["method"])]
            lines.append("Mean over defect types (scored: score jobs done of those planned; fewer means a partial "
                         "mean):\n" + tabulate(table, headers="keys", tablefmt="simple", showindex=False,
                                               disable_numparse=True))
        lines += _downstream_summary(frame)
    failed = [k for k, s in result.states.items() if s == FAILED]
    skipped = [k for k, s in result.states.items() if s == SKIPPED]
    by_key = result.plan.by_key()
    for key in failed:
        status = read_status(result.store.job_dir(key)) or {}
        lines.append(f"FAILED {by_key[key].label}: {status.get('error', '?')}  ({result.store.job_dir(key) / 'status.json'})")
    if skipped:
        lines.append(f"{len(skipped)} jobs skipped because a job they need failed")
    counts = Counter(result.states.values())
    lines.append(f"{counts.get(DONE, 0)} of {len(result.states)} jobs done; run folder {result.store.run_dir}")
    return "\n".join(lines)
