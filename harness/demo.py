"""`defectbench demo`: the main job on the embedded default, driven step by step.

Synthesizes the data set (once, cached), then for each category, method and defect type: split (clean-thirds),
fit, generate, score against the test part; prints one table. The suite runner (Ray, resume, leaderboards)
drives the same steps for whole suites.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from harness.data.layouts import read_category
from harness.data.splits import DEFAULT_PROTOCOL, make_split
from harness.data.synth import SYNTH_VERSION, SynthConfig, synthesize
from harness.generation import fit_method, generate_to
from harness.io import atomic_write_text
from harness.methods import load_method
from harness.metrics.score import DIRECTION, LABELS, METRICS, Scorer, ScoreInputs
from harness.paths import RESULTS_DIR, cache_dir
from harness.tasks import build_task

DEMO_METHODS = ("cutpaste", "croppaste", "draem")
DEMO_CATEGORIES = ("weave", "washer")


def synthetic_root(seed: int = 0) -> Path:
    """The cached synthetic data set for a seed, written on first use."""
    root = cache_dir("synthetic") / f"seed{seed}-v{SYNTH_VERSION}"
    if not root.is_dir():
        synthesize(root, SynthConfig(seed=seed))
    return root


def run_demo(out: Path = RESULTS_DIR / "demo", n: int = 12, seed: int = 0, profile: str = "tiny",
             categories: tuple[str, ...] = DEMO_CATEGORIES, methods: tuple[str, ...] = DEMO_METHODS,
             data: Path | None = None) -> pd.DataFrame:
    root = Path(data) if data else synthetic_root(seed)
    print(f"data set: {root}")
    if out.exists():
        shutil.rmtree(out)
    scorer = Scorer(profile)
    rows = []
    for category_name in categories:
        category = read_category(root, category_name)
        split = make_split(category, DEFAULT_PROTOCOL)
        for method_name in methods:
            method = load_method(method_name, profile)
            groups = [category.defect_types] if method.granularity == "category" else [[d] for d in category.defect_types]
            for defects in groups:
                task = build_task(split, defects, scorer.profile.resolution, seed)
                workdir = out / category_name / method_name / "fit" / "+".join(defects)
                fit_seconds = fit_method(method, task, workdir)
                for defect in defects:
                    start = time.perf_counter()
                    folder = generate_to(method, task, defect, n, seed, out / category_name / method_name / defect, workdir,
                                         meta={"split": split.manifest_hash, "protocol": split.protocol})
                    gen_seconds = time.perf_counter() - start
                    parts = split.defects[defect]
                    inputs = ScoreInputs.from_folder(folder, [s.image for s in parts.test], [s.image for s in parts.centres])
                    values = scorer.score(inputs)
                    row = {"category": category_name, "method": method_name, "defect_type": defect,
                           "fit_s": round(fit_seconds, 2), "generate_s": round(gen_seconds, 2)}
                    row.update({v.metric: v.value for v in values})
                    rows.append(row)
                    print(f"  {category_name:8s} {method_name:10s} {defect:16s} " +
                          " ".join(f"{LABELS[v.metric]}={v.value:.4g}" for v in values))
    table = pd.DataFrame(rows)
    _write_summary(table, out, scorer)
    return table


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean over defect types per category and method (with the count of defect types averaged)."""
    metrics = [m for m in METRICS if m in table]
    grouped = table.groupby(["category", "method"], sort=False)
    summary = grouped[metrics].mean()
    summary["defect_types"] = grouped.size()
    return summary.reset_index()


def _write_summary(table: pd.DataFrame, out: Path, scorer: Scorer) -> None:
    summary = summary_table(table)
    headers = ["category", "method"] + [f"{LABELS[m]}{_arrow(m)}" for m in METRICS if m in summary] + ["defect types"]
    body = summary[["category", "method"] + [m for m in METRICS if m in summary] + ["defect_types"]].values.tolist()
    text = tabulate(body, headers=headers, floatfmt=".4g", tablefmt="github")
    random = [name for name, on in (("Inception", scorer._inception and scorer.inception.resolved.is_random),
                                    ("LPIPS trunk", any(n.trunk.is_random for n in scorer._lpips.values()))) if on]
    note = (f"\nComputed with random weights (no pretrained weights on this machine): {', '.join(random)}. "
            "Compare methods with each other, not with published numbers.\n") if random else ""
    print("\nMean over defect types (protocol clean-thirds, profile " + scorer.profile.name + "):\n")
    print(text + "\n" + note)
    table.to_csv(out / "scores.csv", index=False)
    atomic_write_text(out / "summary.md", text + "\n" + note)
    print(f"per defect type: {out / 'scores.csv'}; summary: {out / 'summary.md'}")


def _arrow(metric: str) -> str:
    return {"up": " ↑", "down": " ↓"}.get(DIRECTION[metric] or "", "")
