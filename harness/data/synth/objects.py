"""Two synthetic objects on plain backgrounds. Defects stay on the object; cracks follow its outline."""
from __future__ import annotations

import numpy as np

from harness.data.synth import draw
from harness.data.synth.base import Defect, Scene, SynthCategory


class Washer(SynthCategory):
    """A machined metal washer (a ring with an orientation notch) on a dark background."""

    name = "washer"
    defect_types = ("chip", "crack", "stain")
    background = np.array([0.10, 0.10, 0.115], dtype=np.float32)
    metal = np.array([0.62, 0.64, 0.69], dtype=np.float32)

    def normal(self, rng: np.random.Generator, size: int) -> Scene:
        y, x = draw.coords(size)
        cy, cx = size / 2 + rng.normal(0, 0.04 * size, 2)
        outer = 0.30 * size * rng.uniform(0.97, 1.03)
        inner = 0.12 * size * rng.uniform(0.97, 1.03)
        dist, angle = np.hypot(y - cy, x - cx), np.arctan2(y - cy, x - cx)
        ring = np.clip(outer - dist + 0.5, 0, 1) * np.clip(dist - inner + 0.5, 0, 1)
        notch_angle = rng.uniform(-np.pi, np.pi)
        notch = (np.abs(np.angle(np.exp(1j * (angle - notch_angle)))) < 0.09) & (dist > outer - 0.035 * size)
        ring = ring * ~notch
        light = rng.uniform(-np.pi, np.pi)
        shade = 0.82 + 0.16 * np.cos(angle - light) + 0.03 * np.sin(2 * np.pi * dist / (2.5 * size / 128))
        metal = self.metal * rng.uniform(0.95, 1.05) * shade[..., None]
        bg = self.background + draw.pixel_noise(rng, size, 0.01)
        image = np.clip(draw.composite(bg, metal + draw.pixel_noise(rng, size, 0.012), ring), 0, 1)
        params = {"centre": (cy, cx), "outer": outer, "inner": inner, "ring": ring}
        return Scene(image.astype(np.float32), ring > 0.5, params)

    def _crack(self, rng, scene: Scene) -> Defect:
        """A jagged crack along the outer outline, a few pixels inside the edge."""
        s, (cy, cx), outer = scene.size, scene.params["centre"], scene.params["outer"]
        start, span = rng.uniform(-np.pi, np.pi), rng.uniform(0.5, 1.2)
        angles = np.linspace(start, start + span, 40)
        radius = outer - rng.uniform(0.025, 0.05) * s
        path = np.stack([cy + radius * np.sin(angles), cx + radius * np.cos(angles)], 1)
        alpha = draw.stroke(s, draw.jitter(rng, path, 0.5 * s / 128), width=rng.uniform(1.3, 2.2) * s / 128)
        alpha = alpha * scene.params["ring"]
        image = draw.composite(scene.image, scene.image * 0.2, alpha)
        mask = alpha > 0.3
        return Defect(image, [mask], f"A crack runs along the outer edge of the washer {draw.location_phrase(mask)}.")

    def _chip(self, rng, scene: Scene) -> Defect:
        """A piece broken off the outer edge: the background shows where metal was."""
        s, (cy, cx), outer = scene.size, scene.params["centre"], scene.params["outer"]
        angle = rng.uniform(-np.pi, np.pi)
        centre = (cy + outer * np.sin(angle), cx + outer * np.cos(angle))
        bite = draw.blob(rng, s, centre, rng.uniform(0.05, 0.085) * s, wobble=0.35)
        removed = bite * scene.params["ring"]
        background = self.background + draw.pixel_noise(rng, s, 0.01)
        image = draw.composite(scene.image, background, removed)
        mask = removed > 0.5
        return Defect(image, [mask], f"A piece is broken off the outer edge of the washer {draw.location_phrase(mask)}.")

    def _stain(self, rng, scene: Scene) -> Defect:
        s, ring = scene.size, scene.params["ring"]
        centre = self.random_point_on(rng, ring > 0.9)
        alpha = draw.blob(rng, s, centre, rng.uniform(0.035, 0.065) * s, wobble=0.4) * ring
        image = draw.composite(scene.image, scene.image * 0.5, 0.9 * alpha)
        mask = alpha > 0.5
        return Defect(image, [mask], f"An oily dark stain on the washer {draw.location_phrase(mask)}.")


class Pill(SynthCategory):
    """A two-tone capsule (red and cream halves) on a light background."""

    name = "pill"
    defect_types = ("color", "contamination", "crack")
    background = np.array([0.92, 0.91, 0.87], dtype=np.float32)
    tones = {"red": np.array([0.80, 0.24, 0.18], np.float32), "cream": np.array([0.93, 0.85, 0.68], np.float32)}

    def normal(self, rng: np.random.Generator, size: int) -> Scene:
        y, x = draw.coords(size)
        cy, cx = size / 2 + rng.normal(0, 0.035 * size, 2)
        theta = rng.uniform(-0.25, 0.25)
        half_length, half_width = 0.31 * size, 0.13 * size * rng.uniform(0.96, 1.04)
        u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)  # along the pill
        v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)  # across it
        core = np.clip(np.abs(u) - (half_length - half_width), 0, None)
        signed = np.hypot(core, v) - half_width  # < 0 inside the stadium
        body = np.clip(0.5 - signed, 0, 1)
        left = u < 0
        colour = np.where(left[..., None], self.tones["red"], self.tones["cream"]) * rng.uniform(0.96, 1.04)
        across = np.clip(1 - (v / half_width) ** 2, 0, 1)
        shade = 0.72 + 0.28 * np.sqrt(across) + 0.18 * np.exp(-((v + 0.4 * half_width) / (0.12 * half_width)) ** 2)
        seam = np.exp(-(u / (0.8 * size / 128)) ** 2) * 0.25
        pill = colour * (shade - seam)[..., None] + draw.pixel_noise(rng, size, 0.01)
        bg = self.background + draw.pixel_noise(rng, size, 0.008)
        image = np.clip(draw.composite(bg, pill, body), 0, 1)
        params = {"centre": (cy, cx), "theta": theta, "half_length": half_length, "half_width": half_width,
                  "u": u, "v": v, "body": body}
        return Scene(image.astype(np.float32), body > 0.5, params)

    def _half_name(self, scene: Scene, mask: np.ndarray) -> str:
        return "red" if scene.params["u"][mask].mean() < 0 else "cream"

    def _crack(self, rng, scene: Scene) -> Defect:
        """A crack along the upper or lower outline of the capsule, a few pixels inside its edge."""
        s, p = scene.size, scene.params
        side = rng.choice([-1.0, 1.0])
        straight = p["half_length"] - p["half_width"]
        u0 = rng.uniform(-straight, straight * 0.3)
        us = np.linspace(u0, u0 + rng.uniform(0.3, 0.7) * straight, 30)
        vs = side * (p["half_width"] - rng.uniform(0.02, 0.04) * s) * np.ones_like(us)
        cy, cx = p["centre"]
        c, sn = np.cos(p["theta"]), np.sin(p["theta"])
        path = np.stack([cy + us * sn + vs * c, cx + us * c - vs * sn], 1)
        alpha = draw.stroke(s, draw.jitter(rng, path, 0.5 * s / 128), width=rng.uniform(1.2, 2.0) * s / 128) * p["body"]
        image = draw.composite(scene.image, scene.image * 0.25, alpha)
        mask = alpha > 0.3
        edge = "upper" if side < 0 else "lower"
        return Defect(image, [mask], f"The {self._half_name(scene, mask)} half of the pill has a crack along its {edge} edge.")

    def _contamination(self, rng, scene: Scene) -> Defect:
        s, body = scene.size, scene.params["body"]
        alpha = np.zeros((s, s), np.float32)
        for _ in range(rng.integers(1, 4)):
            centre = self.random_point_on(rng, body > 0.95)
            alpha = np.maximum(alpha, draw.blob(rng, s, centre, rng.uniform(0.012, 0.028) * s, wobble=0.4))
        alpha *= body
        image = draw.composite(scene.image, scene.image * 0.3 + 0.02, alpha)
        mask = alpha > 0.5
        return Defect(image, [mask], f"Dark specks of contamination on the {self._half_name(scene, mask)} half of the pill.")

    def _color(self, rng, scene: Scene) -> Defect:
        s, body = scene.size, scene.params["body"]
        centre = self.random_point_on(rng, body > 0.95)
        alpha = draw.blob(rng, s, centre, rng.uniform(0.045, 0.08) * s, wobble=0.35) * body
        grey = scene.image.mean(axis=2, keepdims=True)
        faded = 0.45 * scene.image + 0.55 * (grey * np.array([1.0, 0.93, 0.75], np.float32))
        image = draw.composite(scene.image, faded, alpha)
        mask = alpha > 0.5
        return Defect(image, [mask], f"A faded, discoloured patch on the {self._half_name(scene, mask)} half of the pill.")
