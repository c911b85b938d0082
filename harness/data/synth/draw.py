"""Drawing primitives for the synthetic data set: smooth noise, blobs, strokes, and caption phrases.

Images are float32 arrays (H, W, 3) in [0, 1]; alphas are float32 (H, W) in [0, 1]; masks are boolean.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # strokes are drawn at 4x and reduced, for antialiased edges


def coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (size, size) float32."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(axis, axis, indexing="ij")


def smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int] | int) -> np.ndarray:
    """Zero-mean, unit-std value noise: a random (cells+1)-grid upsampled bicubically to size x size."""
    cy, cx = (cells, cells) if isinstance(cells, int) else cells
    grid = rng.standard_normal((cy + 1, cx + 1)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC), dtype=np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def pixel_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    return rng.normal(0.0, sigma, (size, size, 1)).astype(np.float32)


def blob(rng: np.random.Generator, size: int, center: tuple[float, float], radius: float,
         wobble: float = 0.25, harmonics: int = 4) -> np.ndarray:
    """Soft alpha of an irregular round blob: r(theta) = R (1 + sum_k a_k sin(k theta + phi_k))."""
    y, x = coords(size)
    dy, dx = y - center[0], x - center[1]
    theta, dist = np.arctan2(dy, dx), np.hypot(dy, dx)
    outline = np.ones_like(theta)
    for k in range(2, harmonics + 2):
        outline += rng.uniform(-wobble, wobble) / k * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return np.clip(radius * outline - dist + 0.5, 0.0, 1.0).astype(np.float32)


def stroke(size: int, points: np.ndarray, width: float) -> np.ndarray:
    """Antialiased alpha of a polyline through (y, x) points."""
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    scaled = [(float(x) * SUPERSAMPLE, float(y) * SUPERSAMPLE) for y, x in points]
    ImageDraw.Draw(canvas).line(scaled, fill=255, width=max(1, int(round(width * SUPERSAMPLE))), joint="curve")
    reduced = canvas.resize((size, size), Image.BOX)
    return np.asarray(reduced, dtype=np.float32) / 255.0


def polygon(size: int, points: np.ndarray) -> np.ndarray:
    """Antialiased alpha of a filled polygon through (y, x) points."""
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    ImageDraw.Draw(canvas).polygon([(float(x) * SUPERSAMPLE, float(y) * SUPERSAMPLE) for y, x in points], fill=255)
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def wander(rng: np.random.Generator, start: tuple[float, float], heading: float, length: float,
           step: float = 2.0, turn: float = 0.25) -> np.ndarray:
    """A random-walk curve: `length` pixels from `start`, heading changing by N(0, turn) per step."""
    points = [np.array(start, dtype=np.float32)]
    for _ in range(max(2, int(length / step))):
        heading += rng.normal(0.0, turn)
        points.append(points[-1] + step * np.array([np.sin(heading), np.cos(heading)], dtype=np.float32))
    return np.stack(points)


def jitter(rng: np.random.Generator, points: np.ndarray, amount: float) -> np.ndarray:
    """Displace every point perpendicular-ish by N(0, amount): turns a smooth path into a jagged crack."""
    return points + rng.normal(0.0, amount, points.shape).astype(np.float32)


def composite(image: np.ndarray, layer: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return image * (1.0 - a) + layer * a


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def location_phrase(mask: np.ndarray) -> str:
    """'in the upper left', 'in the centre', ... from the mask's centroid."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return "somewhere"
    h, w = mask.shape
    row = ("upper", "middle", "lower")[min(2, int(3 * ys.mean() / h))]
    col = ("left", "centre", "right")[min(2, int(3 * xs.mean() / w))]
    if row == "middle" and col == "centre":
        return "in the centre"
    if row == "middle":
        return f"on the {col}"
    if col == "centre":
        return f"in the {row} part"
    return f"in the {row} {col}"


def size_phrase(mask: np.ndarray) -> str:
    fraction = float(mask.mean())
    if fraction < 0.004:
        return "tiny"
    if fraction < 0.015:
        return "small"
    if fraction < 0.05:
        return "medium-sized"
    return "large"
