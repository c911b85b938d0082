"""What a generated folder holds, read without the methods: samples.jsonl rows, the normal image each sample was
made on, and which stand-ins made them (harness/generation.py writes them)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from harness.io import read_jsonl

SAMPLES_FILE = "samples.jsonl"
META_FILE = "generation.json"


def normal_file(folder: Path, row: dict, root: Path | None = None) -> Path | None:
    """The normal image a sample was made on: its samples.jsonl `normal_path`, relative to the category folder
    (`root`, else the one generation.json recorded); absolute paths (other tools' folders) as they are."""
    if not row.get("normal_path"):
        return None
    path = Path(row["normal_path"])
    if path.is_absolute():
        return path
    if root is None:
        meta = Path(folder) / META_FILE
        recorded = json.loads(meta.read_text()).get("category_root") if meta.is_file() else None
        if not recorded:
            return None
        root = Path(recorded)
    return Path(root) / path


def stand_in_summary(rows: Iterable[dict]) -> str | None:
    """What stand-ins made in these samples (samples.jsonl rows), e.g. "12 of 24 samples: mask: the stand-in
    segmenter's"; None when every sample is the method's own."""
    rows = list(rows)
    counts: dict[str, int] = {}
    for row in rows:
        if row.get("stand_in"):
            counts[row["stand_in"]] = counts.get(row["stand_in"], 0) + 1
    if not counts:
        return None
    return "; ".join(f"{count} of {len(rows)} samples: {reason}" for reason, count in sorted(counts.items()))


def read_samples(folder: Path) -> list[dict]:
    """The rows of a generated folder's samples.jsonl (empty if the folder was not made by DefectBench)."""
    path = Path(folder) / SAMPLES_FILE
    return read_jsonl(path) if path.is_file() else []
