"""Measurements as data.

- The CPU benchmarks: each `make bench` test writes results/bench/cpu-<name>.json (tracked) with what it measured,
  on which machine, at which commit and when; the README's table is rendered from those files. A row transcribed
  from an earlier README, before its benchmark wrote JSON, says so and names the commit that recorded it.
- The methods' claims: each method's claim test (`make test-slow`) writes results/bench/claims-<method>.json, every
  variant's measures and the claims it fails; the method README's claims table is rendered from it.

`make bench-table` renders both; a test checks that the READMEs hold what the files say."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from numbers import Real
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "results" / "bench"
PREFIX = "cpu-"
README_START = "<!-- bench: rendered from results/bench/cpu-*.json by `make bench-table` -->"
README_END = "<!-- /bench -->"
CLAIMS_PREFIX = "claims-"
CLAIMS_END = "<!-- /claims -->"
HEADERS = ["benchmark", "baseline", "result", "target", "measured"]
FIELDS = ("benchmark", "what", "baseline", "result", "target")


def machine() -> str:
    import torch

    return f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.backends.cpu.get_cpu_capability()}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def write(name: str, *, what: str, baseline: str, result: str, target: str, measured: dict,
          out: Path = OUT) -> Path:
    """Write one benchmark's row and its raw numbers (`measured`) as results/bench/cpu-<name>.json."""
    return _save(out / f"{PREFIX}{name}.json", {"benchmark": f"test_bench_{name}.py", "what": what,
                                                  "baseline": baseline, "result": result, "target": target,
                                                  **_stamp(), "measured": measured})


def _stamp() -> dict:
    """When, at which commit and on which machine a measurement was made."""
    return {"date": datetime.date.today().isoformat(), "commit": commit(), "machine": machine()}


def _save(path: Path, record: dict) -> Path:
    """The record as JSON, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_valid_json(record), indent=1, ensure_ascii=False, allow_nan=False) + "\n",
                   encoding="utf-8")
    tmp.replace(path)
    return path


def span(values, digits: int = 1) -> str:
    """'3.1-4.2' (or '3.1' where every value rounds the same), for a result's sentence."""
    low, high = round(min(values), digits), round(max(values), digits)
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def load(folder: Path = OUT) -> list[dict]:
    records = []
    for path in sorted(folder.glob(f"{PREFIX}*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        missing = [f for f in (*FIELDS, "date", "commit") if not record.get(f)]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}")
        records.append(record)
    return records


def render(records: list[dict]) -> str:
    """The README's table (Markdown): one row per benchmark, with when, where and at which commit it was measured."""
    rows = []
    for r in records:
        when = f"{r['date']}, {r['commit']}" + (f", {r['machine']}" if r.get("machine") else "")
        if r.get("transcribed"):
            when += f"; transcribed from the README of {r['commit']} (`make bench` rewrites it)"
        rows.append([f"`{r['benchmark']}`: {r['what']}", r["baseline"], r["result"], r["target"], when])
    if not rows:
        return "No benchmark has written results/bench/cpu-*.json yet."
    lines = [HEADERS, ["---"] * len(HEADERS), *rows]  # unpadded: the cells are sentences
    return "\n".join("| " + " | ".join(cell.replace("\n", " ") for cell in line) + " |" for line in lines)


def readme_block(readme: str) -> str:
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    return readme[start:end].strip()


def update_readme(path: Path, table: str) -> None:
    text = path.read_text(encoding="utf-8")
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    path.write_text(text[:start] + "\n" + table + "\n" + text[end:], encoding="utf-8")


def claims_start(method: str) -> str:
    return f"<!-- claims: rendered from results/bench/{CLAIMS_PREFIX}{method}.json by `make bench-table` -->"


def write_claims(method: str, test: str, claims: dict, controls: dict, variants: dict, out: Path = OUT) -> Path:
    """A method's claim test's result: each variant's numeric measures and the claims it fails (`claims`: name ->
    predicate over the measures; `controls`: control -> the claims it must fail, None: at least one)."""
    recorded = {}
    for variant in sorted(variants, key=lambda name: name != "working"):  # the working method first
        measured = variants[variant]
        numbers = {k: _number(v) for k, v in measured.items() if isinstance(v, Real) and not isinstance(v, bool)}
        recorded[variant] = {"measures": numbers, "fails": [name for name, claim in claims.items()
                                                            if not claim(measured)]}
    return _save(out / f"{CLAIMS_PREFIX}{method}.json", {"method": method, "test": test, **_stamp(),
                                                          "claims": list(claims), "controls": controls,
                                                          "variants": recorded})


def _number(value: Real) -> float | str:
    """A measure as JSON holds it: a float, or "inf" / "-inf" / "nan" (no mask drawn, nothing to compare)."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _valid_json(value):
    """NaN and infinities, which JSON has no numbers for, as "nan" / "inf" / "-inf", anywhere in `value`."""
    if isinstance(value, dict):
        return {k: _valid_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_valid_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _cell(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


def render_claims(method: str, folder: Path = OUT) -> str:
    """A method README's claims table: a row per variant (the working method first), its measures and what it fails."""
    path = folder / f"{CLAIMS_PREFIX}{method}.json"
    if not path.exists():
        return f"Not measured yet: `make test-slow` writes results/bench/{path.name}."
    record = json.loads(path.read_text(encoding="utf-8"))
    variants = record["variants"]
    measures = list(dict.fromkeys(k for v in variants.values() for k in v["measures"]))
    lines = [["Variant", *measures, "Fails"], ["---"] * (len(measures) + 2)]
    for name, variant in variants.items():
        cells = [_cell(variant["measures"][m]) if m in variant["measures"] else "" for m in measures]
        lines.append([name, *cells, "; ".join(variant["fails"]) or "nothing"])
    table = "\n".join("| " + " | ".join(line) + " |" for line in lines)
    return (f"{table}\n\nMeasured {record['date']}, {record['commit']}, {record['machine']}, by "
            f"`{record['test']}` (`make test-slow`).")


def claims_block(readme: str, method: str) -> str | None:
    start = readme.find(claims_start(method))
    if start < 0:
        return None
    return readme[start + len(claims_start(method)):readme.index(CLAIMS_END, start)].strip()


def update_claims(path: Path, method: str, folder: Path = OUT) -> None:
    text = path.read_text(encoding="utf-8")
    marker = claims_start(method)
    start, end = text.index(marker) + len(marker), text.index(CLAIMS_END, text.index(marker))
    path.write_text(text[:start] + "\n" + render_claims(method, folder) + "\n" + text[end:], encoding="utf-8")


def methods_with_claims() -> list[str]:
    return sorted(p.parent.name for p in (REPO / "methods").glob("*/README.md")
                  if claims_start(p.parent.name) in p.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render the README's CPU benchmark table from results/bench")
    parser.add_argument("--write-readme", action="store_true", help="put the table into README.md")
    args = parser.parse_args(argv)
    table = render(load())
    if args.write_readme:
        update_readme(REPO / "README.md", table)
        for method in methods_with_claims():
            update_claims(REPO / "methods" / method / "README.md", method)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
