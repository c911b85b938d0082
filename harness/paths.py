"""Where DefectBench keeps its outputs and caches (override the cache with $DEFECTBENCH_CACHE)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "results"


def cache_dir(*parts: str) -> Path:
    """A folder under results/cache (or $DEFECTBENCH_CACHE), created on demand."""
    root = Path(os.environ.get("DEFECTBENCH_CACHE") or RESULTS_DIR / "cache")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
