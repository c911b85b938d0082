"""`defectbench leaderboard [SUITE]`: results/leaderboard/<suite>.md and .tex (and figures) from the records.

Tables are rendered from the records of the suite's latest run only; nothing printed is typed in by hand:
every measured cell is a mean of records, and reported cells come from results/reported/*.yaml with their
source table.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pandas as pd

from harness.data.splits import COMPAT_PROTOCOLS
from harness.errors import ConfigError
from harness.io import atomic_write_text, sha256_json
from harness.downstream.data import ALL
from harness.downstream.detectors import DETECTORS
from harness.metrics.specs import GENERATION, IMAGE_METRICS, LOCO_METRICS, PIXEL_METRICS, SPECS, label, names
from harness.paths import RESULTS_DIR
from harness.report.figures import bar_chart, sample_grid
from harness.report.reported import load_reported, table_rows
from harness.report.render import (latex_document, latex_method_rows, latex_table, markdown_method_rows,
                                   markdown_table, tex_escape)
from harness.report.tables import Coverage, Table, build_table
from harness.results import MISSING, run_records, run_states
from harness.runner.store import FAILED as FAILED_STATE
from harness.runner.store import SKIPPED
from harness.runner.store import RunStore, latest_run, results_root
from harness.runner.suite import path_component

DETECTION_METRICS = (*IMAGE_METRICS, *PIXEL_METRICS)
LOCO_KINDS = (("logical_anomalies", "logical anomalies"), ("structural_anomalies", "structural anomalies"))
TEST_SELECTED = " †"  # appended to a method whose U-Net was selected on the test part
# the generation tables: MetricSpec.group -> the title and the papers' table each takes its shape from
TABLE_GROUPS = tuple((group, title, names(family=GENERATION, group=group), shape) for group, title, shape in (
    ("quality", "Generation quality: IS and IC-LPIPS", "in the shape of DualAnoDiff Table 1 and AnomalyDiffusion Table 1"),
    ("fidelity", "Closeness to the real defects: FID, KID and LPIPS to the nearest training defect",
     "in the shape of Cho et al. Table 1 (FID, LPIPS)"),
    ("background", "Background fidelity and mask alignment",
     "samples made on a known normal image; not reported by the papers"),
))
# closeness to the real defects first, then quality, then the background: the bar charts' and footnotes' order
BY_GROUP = tuple(m for group in ("fidelity", "quality", "background") for m in names(family=GENERATION, group=group))
HEADLINE = tuple(m for m in BY_GROUP if SPECS[m].headline)  # a bar chart each
PUBLISHED_RULES = ("ᵖ: protocol `{protocol}` reproduces published numbers, so these columns use the published "
                   "evaluation code's rules (image score pooled with the zero padding counted, only fully covered mask "
                   "pixels as defects, pixel F1-max over 21 thresholds with `>`, AUPRO at 100 thresholds); the exact "
                   "metrics are in the records under the names without `_compat`.")
REPORTED_DIR = RESULTS_DIR / "reported"


def file_name(*parts: str, suffix: str = ".png") -> str:
    """A file name from display names (method labels may hold spaces, ':' or parentheses): unsafe characters
    become '_', and a short hash keeps two labels that slug alike apart."""
    text = "-".join(parts)
    slug = re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("._") or "figure"
    return slug + ("" if slug == text else "-" + sha256_json(text)[:6]) + suffix


def leaderboard_dir(results: Path | None = None) -> Path:
    return results_root(results) / "leaderboard"


def render_leaderboard(suite: str, results: Path | None = None, out_dir: Path | None = None,
                       show_reported: bool = True, reported_dir: Path = REPORTED_DIR) -> tuple[Path, Path]:
    out_dir = out_dir or leaderboard_dir(results)
    path_component(suite, str(out_dir), "suite")  # '..' or '/' would write outside the leaderboard folder
    store = latest_run(suite, results)
    if store is None:
        raise ConfigError(f"no run of suite {suite!r} found; run `defectbench run {suite}` first")
    manifest = store.read_manifest()
    config = manifest["config"]
    states = run_states(store)  # raises DamagedError naming a damaged file: no table from damaged records
    records = run_records(store, states)
    methods = [m["label"] for m in config["methods"]]
    reported = load_reported(reported_dir) if show_reported else []
    caption = _caption(manifest)
    md = [f"# Leaderboard: `{suite}`", "", caption, ""]
    not_run = sum(s["state"] == MISSING for s in states.values())
    if not_run:  # a stopped run: its tables mark the cells these jobs feed
        md += [f"**Incomplete run:** {not_run} of {len(states)} jobs have not run (the run was stopped); "
               f"`defectbench run {suite}` resumes it.", ""]
    tex: list[str] = []
    figures_dir = out_dir / suite
    for dataset in config["datasets"]:
        name = dataset["name"]
        categories = _categories(states, name)
        frame = records[records["dataset"] == name] if not records.empty else records
        md += [f"## Data set `{name}` ({len(categories)} categories)", ""]
        warned = [w.split(": ", 1)[1] for w in manifest.get("warnings", []) if w.startswith(f"{name}: ")]
        md += [f"- Data warning: {w}" for w in warned] + ([""] if warned else [])
        gen_md, gen_tex = _generation_tables(frame, states, manifest, store, dataset, categories, methods, caption,
                                             suite, reported)
        md += gen_md
        tex += gen_tex
        down_md, down_tex = _downstream_tables(frame, states, manifest, store, dataset, categories, methods, caption,
                                               suite, reported)
        md += down_md
        tex += down_tex
        md += _figures(frame, states, manifest, name, methods, figures_dir, out_dir)
    md_path, tex_path = out_dir / f"{suite}.md", out_dir / f"{suite}.tex"
    atomic_write_text(md_path, "\n".join(md).rstrip() + "\n")
    atomic_write_text(tex_path, latex_document(tex))
    return md_path, tex_path


def _coverage(states: dict, dataset: str, kinds: tuple[str, ...], defect_type: str | None = None
              ) -> dict[tuple[str, str], Coverage]:
    """(category, row label) -> how many jobs of these kinds feed the cell and how many failed (or were skipped
    because a job they need failed); a U-Net selected on the test part is labelled as its records are. With
    `defect_type`, only the jobs of that defect type (a LOCO table of one kind of anomaly)."""
    planned: Counter = Counter()
    failed: Counter = Counter()
    not_run: Counter = Counter()
    for state in states.values():
        job, tags = state["job"], state["job"]["tags"]
        if defect_type is not None and tags.get("defect_type") != defect_type:
            continue
        if job["kind"] in kinds and tags.get("dataset") == dataset:
            marked = job["kind"] == "segment" and tags.get("selection") == "test"
            cell = (tags.get("category"), tags.get("method") + (TEST_SELECTED if marked else ""))
            planned[cell] += 1
            failed[cell] += state["state"] in (FAILED_STATE, SKIPPED)
            not_run[cell] += state["state"] == MISSING
    return {cell: Coverage(n, failed[cell], not_run[cell]) for cell, n in planned.items()}


def _generation_tables(frame: pd.DataFrame, states: dict, manifest: dict, store: RunStore, dataset: dict,
                       categories: list[str], methods: list[str], caption: str, suite: str,
                       reported: list) -> tuple[list[str], list[str]]:
    """The generation metrics per category (mean over defect types); MVTec LOCO-style categories also get a table
    of their logical and one of their structural anomalies (AnomalyXFusion Table 2)."""
    config, name = manifest["config"], dataset["name"]
    loco = [c for c in categories if _is_loco(frame, c)]
    scopes = [(ALL, "", categories)] + [(kind, title, loco) for kind, title in LOCO_KINDS if loco]
    md, tex = [], []
    for key, title, metrics, shape in TABLE_GROUPS:
        wanted = [m for m in metrics if m in config["metrics"]]
        if not wanted:
            continue
        for defect_type, scope, cats in scopes:
            subset = frame if defect_type == ALL or frame.empty else frame[frame["defect_type"] == defect_type]
            extra, sources = table_rows(reported, dataset.get("layout"), cats, wanted,
                                        "all" if defect_type == ALL else defect_type)
            coverage = _coverage(states, name, ("score",), None if defect_type == ALL else defect_type)
            table = build_table(title, subset, coverage, wanted, methods, cats, extra)
            named = f"{title} ({scope})" if scope else title
            notes = _notes(table, manifest, sources, store)
            mark_random = _mark(table)
            per = "mean over defect types per category" if not scope else f"{scope} only"
            md += [f"### {named}", f"_{shape}; {per}._", "",
                   markdown_table(table, mark_random), ""] + [f"- {n}" for n in notes] + [""]
            tex.append(latex_table(table, tex_escape(f"{named} ({name}). ") + tex_escape(caption.replace("`", "")) +
                                   "." + ("" if not notes else " " + tex_escape(" ".join(notes))),
                                   f"tab:{suite}-{name}-{key}" + ("" if defect_type == ALL else f"-{defect_type}"),
                                   mark_random))
    return md, tex


def _downstream_tables(frame: pd.DataFrame, states: dict, manifest: dict, store: RunStore, dataset: dict,
                       categories: list[str], methods: list[str], caption: str, suite: str,
                       reported: list) -> tuple[list[str], list[str]]:
    """Detection (Cho et al. Table 2), per-category pixel AUROC / AP (DualAnoDiff Table 4) and classification
    accuracy (DualAnoDiff Table 3); MVTec LOCO-style categories also get logical and structural tables."""
    config = manifest["config"]
    if not config.get("downstream") and not config.get("detectors"):
        return [], []
    name = dataset["name"]
    frame = _mark_test_selection(frame)
    synthetic = _synthetic_labels(frame, methods)  # segmentation rows
    plain = list(methods)  # classification rows (no checkpoint selection on test)
    detectors = [DETECTORS[d["name"]].label for d in config.get("detectors", [])]
    failed = _coverage(states, name, ("segment", "detect"))
    published = config["protocol"] in COMPAT_PROTOCOLS  # reproduce the published numbers: their evaluation code too
    suffix = "_compat" if published else ""
    rules = [PUBLISHED_RULES.format(protocol=config["protocol"])] if published else []
    md, tex = [], []
    scopes = [(ALL, "all defect types", categories)]
    loco = [c for c in categories if _is_loco(frame, c)]
    scopes += [(kind, title, loco) for kind, title in LOCO_KINDS if loco]
    for defect_type, scope, cats in scopes:
        subset = frame[frame["defect_type"] == defect_type] if not frame.empty else frame
        metrics = [m + suffix for m in DETECTION_METRICS]
        if set(cats) <= set(loco):  # MVTec LOCO's own localisation metric, for its categories
            metrics += list(LOCO_METRICS)
        extra, sources = table_rows(reported, dataset.get("layout"), cats, metrics,
                                    "all" if defect_type == ALL else defect_type, suffix)
        table = build_table("Detection", subset, failed, metrics, [*detectors, *synthetic], cats, extra)
        if not any(c.state == "ok" and not c.reported for c in table.cells.values()):
            continue
        papers = [m for m in table.methods if m not in detectors and m not in synthetic]
        groups = [(g, m) for g, m in (("Unsupervised (anomalib, normal images only)", detectors),
                                       ("Synthetic-based (U-Net trained on generated defects)", synthetic),
                                       ("Reported by the papers (their protocols and weights)", papers)) if m]
        notes = _downstream_notes(table, frame, store) + rules + _reported_notes(sources) + [
            f"Mean over {len(cats)} categor{'y' if len(cats) == 1 else 'ies'} ({scope})."]
        title = f"Detection and localisation ({scope})"
        md += [f"### {title}", "_in the shape of Cho et al. Table 2; image- and pixel-level, in %._", "",
               markdown_method_rows(table, groups, _mark(table)), ""] + [f"- {n}" for n in notes] + [""]
        tex.append(latex_method_rows(table, groups, tex_escape(f"{title} ({name}). {caption.replace('`', '')}. "
                                                               + " ".join(notes)),
                                     f"tab:{suite}-{name}-detection-{defect_type}", _mark(table)))
    per_category = [("pixel", "Localisation per category: pixel AUROC and AP", ("pixel_auroc" + suffix, "pixel_ap" + suffix),
                     "in the shape of DualAnoDiff Table 4", failed, ALL),
                    ("classification", "Defect classification accuracy (ResNet-34 on generated images)",
                     ("accuracy",), "in the shape of DualAnoDiff Table 3", _coverage(states, name, ("classify",)), ALL)]
    for key, title, metrics, shape, bad, defect_type in per_category:
        subset = frame[frame["defect_type"] == defect_type] if not frame.empty else frame
        extra, sources = table_rows(reported, dataset.get("layout"), categories, list(metrics),
                                    suffix=suffix if key == "pixel" else "")
        table = build_table(title, subset, bad, list(metrics), synthetic if key == "pixel" else plain, categories,
                            extra)
        if not any(c.state == "ok" and not c.reported for c in table.cells.values()):
            continue
        notes = _downstream_notes(table, frame, store) + (rules if key == "pixel" else []) + _reported_notes(sources)
        md += [f"### {title}", f"_{shape}, in %._", "", markdown_table(table, _mark(table)), ""] + \
              [f"- {n}" for n in notes] + [""]
        tex.append(latex_table(table, tex_escape(f"{title} ({name}). {caption.replace('`', '')}. " + " ".join(notes)),
                               f"tab:{suite}-{name}-{key}", _mark(table)))
    return md, tex


def _mark_test_selection(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "selection" not in frame:
        return frame
    frame = frame.copy()
    chosen_on_test = frame["selection"] == "test"
    frame.loc[chosen_on_test, "method"] = frame.loc[chosen_on_test, "method"] + TEST_SELECTED
    return frame


def _synthetic_labels(frame: pd.DataFrame, methods: list[str]) -> list[str]:
    """Method labels of the segmentation rows: '<method> †' where its U-Net was selected on the test part."""
    if frame.empty or "selection" not in frame:
        return list(methods)
    marked = set(frame.loc[frame["selection"] == "test", "method"])
    return [m + TEST_SELECTED if m + TEST_SELECTED in marked else m for m in methods]


def _is_loco(frame: pd.DataFrame, category: str) -> bool:
    if frame.empty:
        return False
    types = set(frame.loc[frame["category"] == category, "defect_type"].dropna())
    return {k for k, _ in LOCO_KINDS} <= types


def _mark(table: Table) -> bool:
    return any(c.random for c in table.cells.values()) and not _all_random(table)


def _downstream_notes(table: Table, frame: pd.DataFrame, store: RunStore) -> list[str]:
    notes = _random_notes(table, "Every backbone here started from random weights (no ImageNet weights on this "
                                 "machine): compare rows with each other, not with published numbers.",
                          "\\* a backbone started from random weights (no ImageNet weights on this machine).")
    if any(m.endswith(TEST_SELECTED) for m in table.methods):
        notes.append("† U-Net checkpoint selected on the test part (`select_on: test`), the published practice: "
                     "optimistic, not comparable with rows selected on the validation part.")
    return notes + _failure_note(table, store)


def _random_notes(table: Table, all_random: str, some_random: str) -> list[str]:
    """The table's own notes, and what random weights mean for it (all of it, or the cells marked *)."""
    if _all_random(table):
        return [*table.notes, all_random]
    return [*table.notes, some_random] if any(c.random for c in table.cells.values()) else list(table.notes)


def _failure_note(table: Table, store: RunStore) -> list[str]:
    """What the marks of incomplete, failed, small-reference and uncomputed cells mean in this table."""
    cells = [c for c in table.cells.values() if not c.reported]
    notes = []
    if any(c.state == "failed" or (c.incomplete and c.failed) for c in cells):
        notes.append("—<sup>f</sup>: every job feeding the cell failed; <sup>f k/n</sup>: the value covers k of the n "
                     "values planned, the jobs of the others failed (or were skipped because a job they need failed); "
                     "such cells and the averages they feed are not ranked. Tracebacks are in the jobs' status.json "
                     f"under `runs/{store.suite}/{store.run_id}/jobs` of the results folder.")
    if any(c.incomplete and not c.failed for c in cells):
        notes.append("<sup>k/n</sup>: the value covers k of the n values planned (the rest were not computed: the run "
                     "was stopped, or the metric lacked inputs, see below); not ranked.")
    if any(c.state != "ok" and c.not_run for c in cells):
        notes.append("—<sup>0/n</sup>: none of the n values planned was computed: the jobs feeding the cell have not "
                     "run (the run was stopped; running the suite again resumes it).")
    if any(c.small for c in cells):
        notes.append("<sup>s</sup>: computed from fewer images than the metric's documented minimum ("
                     + "; ".join(f"{s.label}: {s.minimum[1]} {s.minimum[0]}" for s in map(SPECS.__getitem__, BY_GROUP) if s.minimum) +
                     "); the record holds the sizes.")
    for summary, example in table.stand_ins.items():
        notes.append(f"<sup>‡</sup>: made partly by a stand-in (e.g. {example}): {summary}.")
    for reason, example in table.missing_reasons.items():
        notes.append(f"Not computed (e.g. {example}): {reason}.")
    return notes


def _caption(manifest: dict) -> str:
    config = manifest["config"]
    seeds = ", ".join(str(s) for s in config["seeds"])
    return (f"Protocol `{config['protocol']}` · profile `{config['profile']}` · {config['n_per_defect']} generated images "
            f"per defect type · seeds {seeds} · IC-LPIPS `{config['ic_lpips']}` · code `{manifest['code']['git']}` · "
            f"run `{manifest['run_id']}`")


def _categories(states: dict, dataset: str) -> list[str]:
    seen: dict[str, None] = {}
    for state in states.values():
        tags = state["job"]["tags"]
        if tags.get("dataset") == dataset and tags.get("category"):
            seen.setdefault(tags["category"], None)
    return list(seen)


def _all_random(table: Table) -> bool:
    measured = [c for c in table.cells.values() if c.state == "ok" and not c.reported]
    return bool(measured) and all(c.random for c in measured)


def _notes(table: Table, manifest: dict, sources: list[str], store: RunStore) -> list[str]:
    notes = _random_notes(table, "All measured values were computed with random-weight feature extractors (no "
                                 "pretrained Inception / LPIPS weights where they ran): compare methods with each "
                                 "other, not with published numbers.",
                          "\\* computed with random-weight feature extractors.")
    protocol = manifest["config"]["protocol"]
    if protocol in COMPAT_PROTOCOLS:
        notes.append(f"Protocol `{protocol}` reproduces a published split: images in both the generator's training "
                     "part and the test part are possible (AnomalyDiffusion: exactly one per defect type). The U-Nets "
                     "and detectors read the test images as the published localisation code does (OpenCV's bilinear "
                     "resize, no antialiasing).")
    return notes + _failure_note(table, store) + _reported_notes(sources)


def _reported_notes(sources: list[str]) -> list[str]:
    notes = [f"'(reported)': numbers from {source}, under the paper's own protocol and weights." for source in sources]
    if sources:
        notes.append("A reported Average shows the paper's printed value and, in brackets, the mean of the printed rows "
                     "of this table's categories; ≠ marks a printed average more than one unit of its last digit away "
                     "from that mean (the papers' averages often disagree with their own rows).")
    return notes


def _figures(frame: pd.DataFrame, states: dict, manifest: dict, dataset: str, methods: list[str], figures_dir: Path,
             out_dir: Path) -> list[str]:
    config = manifest["config"]
    lines = ["### Figures", ""]
    if not frame.empty:
        charts = []
        for metric in HEADLINE:
            if metric not in config["metrics"]:
                continue
            per_category = frame[frame["metric"] == metric].groupby(["method", "category"])["value"].mean()
            if per_category.empty:
                continue
            averages = per_category.groupby("method").agg(["mean", "std", "count"]).reindex(
                [m for m in methods if m in per_category.index.get_level_values(0)])
            path = bar_chart(averages, metric, figures_dir / file_name(dataset, "bar", metric),
                             f"{label(metric)}: mean over categories ({dataset})")
            charts.append(f"![{label(metric)}]({path.relative_to(out_dir).as_posix()})")
        lines += [" ".join(charts), ""]
    root = (manifest.get("data") or {}).get(dataset)
    grids = _grids(states, dataset, methods, figures_dir, out_dir, config["seeds"][0], Path(root) if root else None)
    if grids:
        lines += ["Samples (normal image | generated | mask outline):", "", "| category | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for category, row in grids.items():
            lines.append(f"| {category} | " + " | ".join(row.get(m, "—") for m in methods) + " |")
        lines.append("")
    return lines


def _grids(states: dict, dataset: str, methods: list[str], figures_dir: Path, out_dir: Path, first_seed: int,
           root: Path | None) -> dict[str, dict[str, str]]:
    """One grid per category and method, from the first fold and the first seed."""
    folders: dict[tuple[str, str], dict[str, Path]] = {}
    for key, state in states.items():
        job, tags = state["job"], state["job"]["tags"]
        if job["kind"] != "generate" or state["state"] != "done" or tags.get("dataset") != dataset:
            continue
        if tags.get("fold", 0) != 0 or tags.get("seed") != first_seed:
            continue
        folders.setdefault((tags["category"], tags["method"]), {}).setdefault(tags["defect_type"],
                                                                             state["folder"] / "samples")
    grids: dict[str, dict[str, str]] = {}
    for (category, method), by_defect in sorted(folders.items()):
        path = sample_grid(by_defect, figures_dir / file_name(dataset, category, method), f"{method} on {category}",
                           root / category if root else None)
        if path:
            grids.setdefault(category, {})[method] = f"![{method} {category}]({path.relative_to(out_dir).as_posix()})"
    return grids
