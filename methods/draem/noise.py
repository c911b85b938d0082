"""Perlin gradient noise and procedural textures (DRAEM's anomaly masks and texture sources)."""
from __future__ import annotations

import cv2
import numpy as np


def fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin(rng: np.random.Generator, shape: tuple[int, int], res: tuple[int, int]) -> np.ndarray:
    """2-D Perlin noise over `shape` with `res` = (cells along y, cells along x); values about in [-1, 1].

    Random unit gradients sit on the (res+1) lattice; each pixel interpolates the dot products of the four
    surrounding gradients with its offsets from those corners, weighted by the fade curve, scaled by sqrt(2).
    """
    h, w = shape
    ry, rx = res
    gy = np.arange(h, dtype=np.float64) * ry / h
    gx = np.arange(w, dtype=np.float64) * rx / w
    iy, ix = np.floor(gy).astype(int), np.floor(gx).astype(int)
    fy, fx = (gy - iy)[:, None], (gx - ix)[None, :]
    angles = rng.uniform(0.0, 2 * np.pi, (ry + 1, rx + 1))
    grad_y, grad_x = np.sin(angles), np.cos(angles)

    def corner(dy: int, dx: int) -> np.ndarray:
        cy, cx = (iy + dy)[:, None], (ix + dx)[None, :]
        return (fy - dy) * grad_y[cy, cx] + (fx - dx) * grad_x[cy, cx]

    ty, tx = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - tx) + corner(0, 1) * tx
    bottom = corner(1, 0) * (1 - tx) + corner(1, 1) * tx
    return (np.sqrt(2.0) * (top * (1 - ty) + bottom * ty)).astype(np.float32)


def rotate(array: np.ndarray, angle_deg: float, border_value: float = 0.0) -> np.ndarray:
    """Rotate about the centre, keeping the size; uncovered corners get `border_value`."""
    h, w = array.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle_deg, 1.0)
    return cv2.warpAffine(array, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=border_value)


def fractal_perlin(rng: np.random.Generator, shape: tuple[int, int], res: tuple[int, int], octaves: int = 4,
                   persistence: float = 0.5) -> np.ndarray:
    noise = np.zeros(shape, np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        noise += amplitude * perlin(rng, shape, (res[0] * 2 ** octave, res[1] * 2 ** octave))
        amplitude *= persistence
    return noise


def procedural_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random colourful texture (uint8, size x size x 3): fractal noise through a random palette,
    sometimes modulated by stripes or a grid. A stand-in for DTD when no texture folder is configured."""
    base = 2 ** rng.integers(1, 4)
    value = fractal_perlin(rng, (size, size), (base, base), octaves=int(rng.integers(2, 5)))
    value = (value - value.min()) / (value.max() - value.min() + 1e-6)
    pattern = rng.integers(3)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if pattern == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16) * size / 128
        value = 0.6 * value + 0.4 * (0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period))
    elif pattern == 2:
        period = rng.uniform(6, 20) * size / 128
        value = 0.7 * value + 0.3 * (((x // period) + (y // period)) % 2)
    palette = rng.uniform(0, 255, (int(rng.integers(2, 4)), 3))
    stops = np.linspace(0, 1, len(palette))
    channels = [np.interp(value, stops, palette[:, c]) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
