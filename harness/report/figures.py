"""Figures of a run: a sample grid per method and category, and a bar chart per headline metric."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from harness.data.images import read_image, read_mask
from harness.data.samples import normal_file, read_samples
from harness.metrics.specs import direction, label

TILE = 128
PER_DEFECT = 2


def _outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    out = image.copy()
    out[edge] = (255, 0, 64)
    return out


def _font() -> ImageFont.ImageFont:
    """Pillow's default font at 12 px (its bitmap fallback runs words together: 'dualanodiffon tray')."""
    try:
        return ImageFont.load_default(size=12)
    except (TypeError, OSError):  # a Pillow without FreeType
        return ImageFont.load_default()


def sample_grid(sample_folders: dict[str, Path], out: Path, title: str, normals_root: Path | None = None) -> Path | None:
    """Rows: up to two samples per defect type; columns: normal image | generated | generated with mask outline."""
    rows = []
    for defect, folder in sorted(sample_folders.items()):
        for row in read_samples(folder)[:PER_DEFECT]:
            generated = read_image(folder / row["image"], TILE)
            mask = read_mask(folder / row["mask"], TILE)
            normal_path = normal_file(folder, row, normals_root)
            has_normal = bool(normal_path and normal_path.is_file())
            normal = read_image(normal_path, TILE) if has_normal else np.full_like(generated, 255)
            missing = None if has_normal else "not found" if row.get("normal_path") else "none: drawn from noise"
            rows.append((defect, np.concatenate([normal, generated, _outline(generated, mask)], axis=1), missing))
    if not rows:
        return None
    label_width, header = 150, 24
    canvas = Image.new("RGB", (label_width + 3 * TILE, header + TILE * len(rows)), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    draw.text((4, 6), title, fill="black", font=font)
    for i, name in enumerate(("normal", "generated", "mask")):
        draw.text((label_width + i * TILE + 4, 6), name, fill="black", font=font)
    for r, (defect, strip, missing) in enumerate(rows):
        canvas.paste(Image.fromarray(strip), (label_width, header + r * TILE))
        draw.text((4, header + r * TILE + TILE // 2 - 6), defect[:22], fill="black", font=font)
        if missing:  # drawn from noise (DualAnoDiff), or the data set is not where the run found it
            draw.text((label_width + 4, header + r * TILE + TILE // 2 - 6), missing, fill="gray", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def bar_chart(averages: pd.DataFrame, metric: str, out: Path, title: str) -> Path:
    """`averages`: rows per method with columns mean, std, n (over categories)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(3.5, 0.9 * len(averages) + 1.5), 3.2), dpi=110)
    ax.bar(averages.index, averages["mean"], yerr=averages["std"].fillna(0), capsize=4, color="#4c72b0")
    arrow = {"up": " (higher is better)", "down": " (lower is better)"}.get(direction(metric) or "", "")
    ax.set_ylabel(label(metric) + arrow)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
