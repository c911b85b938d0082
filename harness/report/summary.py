"""The console summary of a run: the headline metrics per method and category, and what failed."""
from __future__ import annotations

from collections import Counter

from tabulate import tabulate

from harness.results import run_records
from harness.runner.run import RunResult
from harness.runner.store import DONE, FAILED, SKIPPED, read_status


def _downstream_summary(frame) -> list[str]:
    """Downstream models and detectors over the whole test part, in %."""
    from harness.downstream.data import ALL
    from harness.metrics.detection import LABELS

    metrics = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro", "accuracy"]
    rows = frame[frame["metric"].isin(metrics) & (frame["defect_type"] == ALL)]
    if rows.empty:
        return []
    table = (100 * rows.pivot_table(index=["category", "method"], columns="metric", values="value", aggfunc="mean"))
    table = table[[m for m in metrics if m in table.columns]].rename(columns=LABELS).reset_index()
    table = table.astype(object).where(table.notna(), None)  # tabulate prints None as missingval, NaN as "nan"
    return ["Downstream (segmentation U-Net / classifier on generated images) and detectors, whole test part, %:\n"
            + tabulate(table, headers="keys", floatfmt=".1f", tablefmt="simple", showindex=False,
                     missingval="—")]


def _scored(result: RunResult, category: str, method: str) -> str:
    jobs = [j for j in result.plan.jobs if j.kind == "score" and j.tags.get("category") == category
            and j.tags.get("method") == method]
    done = sum(result.states.get(j.key) == DONE for j in jobs)
    return f"{done}/{len(jobs)}" + ("" if done == len(jobs) else " !")


def summary(result: RunResult) -> str:
    """A table per method and category: the headline metrics (mean over defect types) and job failures."""
    from harness.metrics.score import LABELS, METRICS

    frame = run_records(result.store)
    lines = []
    if not frame.empty:
        metrics = [m for m in METRICS if m in set(frame["metric"])]
        table = frame[frame["metric"].isin(metrics)].pivot_table(index=["category", "method"], columns="metric",
                                                                 values="value", aggfunc="mean")
        table = table[[m for m in metrics if m in table.columns]].rename(columns=LABELS).reset_index()
        table["scored"] = [_scored(result, category, method) for category, method in zip(table["category"],
                                                                                          table["method"])]
        lines.append("Mean over defect types (scored: score jobs done of those planned; fewer means a partial mean):\n"
                     + tabulate(table, headers="keys", floatfmt="#.4g", tablefmt="simple", showindex=False))
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
