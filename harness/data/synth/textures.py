"""Two synthetic textures. Every defect takes its colour from the surface it lands on."""
from __future__ import annotations

import numpy as np

from harness.data.synth import draw
from harness.data.synth.base import Defect, Scene, SynthCategory


class Weave(SynthCategory):
    """A woven fabric in teal: alternating warp and weft threads."""

    name = "weave"
    defect_types = ("hole", "stain", "thread")
    base = np.array([0.22, 0.48, 0.52], dtype=np.float32)

    def normal(self, rng: np.random.Generator, size: int) -> Scene:
        y, x = draw.coords(size)
        period = 8.0 * size / 128
        py, px = rng.uniform(0, period, 2)
        warp = 0.5 + 0.5 * np.sin(2 * np.pi * (x + px) / period)
        weft = 0.5 + 0.5 * np.sin(2 * np.pi * (y + py) / period)
        checker = (np.floor((x + px) / period) + np.floor((y + py) / period)) % 2 == 0
        shade = 0.72 + 0.35 * np.where(checker, warp, weft) + 0.04 * draw.smooth_noise(rng, size, 4)
        colour = self.base * rng.uniform(0.95, 1.05) * (1 + rng.normal(0, 0.02, 3)).astype(np.float32)
        image = np.clip(colour * shade[..., None] + draw.pixel_noise(rng, size, 0.015), 0, 1)
        return Scene(image.astype(np.float32), np.ones((size, size), bool))

    def _stain(self, rng, scene: Scene) -> Defect:
        s = scene.size
        radius = rng.uniform(0.06, 0.13) * s
        alpha = draw.blob(rng, s, self.random_point_on(rng, scene.foreground, int(radius)), radius, wobble=0.35)
        image = draw.composite(scene.image, scene.image * 0.45, 0.9 * alpha)
        mask = alpha > 0.5
        return Defect(image, [mask], f"A {draw.size_phrase(mask)} dark stain {draw.location_phrase(mask)} of the woven fabric.")

    def _hole(self, rng, scene: Scene) -> Defect:
        s = scene.size
        radius = rng.uniform(0.03, 0.07) * s
        centre = self.random_point_on(rng, scene.foreground, int(radius) + 3)
        hole = draw.blob(rng, s, centre, radius, wobble=0.3)
        rim = np.clip(draw.blob(rng, s, centre, radius + 2.0 * s / 128, wobble=0.3) - hole, 0, 1)
        image = draw.composite(scene.image, np.clip(scene.image * 1.35, 0, 1), rim)
        image = draw.composite(image, scene.image * 0.08, hole)
        mask = (hole + rim) > 0.5
        return Defect(image, [mask], f"A {draw.size_phrase(mask)} hole with frayed edges {draw.location_phrase(mask)} of the woven fabric.")

    def _thread(self, rng, scene: Scene) -> Defect:
        s = scene.size
        start = self.random_point_on(rng, scene.foreground, s // 6)
        path = draw.wander(rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.6) * s, step=2.0 * s / 128)
        alpha = draw.stroke(s, path, width=2.2 * s / 128)
        image = draw.composite(scene.image, np.clip(scene.image * 1.7 + 0.08, 0, 1), alpha)
        mask = alpha > 0.3
        return Defect(image, [mask], f"A loose light thread lies on the woven fabric {draw.location_phrase(mask)}.")


class Grain(SynthCategory):
    """Wood with vertical grain lines warped by low-frequency noise."""

    name = "grain"
    defect_types = ("crack", "liquid", "scratch")
    base = np.array([0.58, 0.38, 0.21], dtype=np.float32)

    def normal(self, rng: np.random.Generator, size: int) -> Scene:
        y, x = draw.coords(size)
        warp = draw.smooth_noise(rng, size, (3, 2)) * 5.0 * size / 128
        period = 11.0 * size / 128
        rings = np.sin(2 * np.pi * (x + warp + rng.uniform(0, period)) / period)
        fibres = draw.smooth_noise(rng, size, (3, 40))
        shade = 0.82 + 0.12 * rings + 0.05 * fibres + 0.04 * draw.smooth_noise(rng, size, 3)
        colour = self.base * rng.uniform(0.93, 1.07) * (1 + rng.normal(0, 0.02, 3)).astype(np.float32)
        image = np.clip(colour * shade[..., None] + draw.pixel_noise(rng, size, 0.012), 0, 1)
        return Scene(image.astype(np.float32), np.ones((size, size), bool), {"warp": warp})

    def _crack(self, rng, scene: Scene) -> Defect:
        """A crack follows the grain: its x position is displaced by the same warp field as the grain lines."""
        s, warp = scene.size, scene.params["warp"]
        x0 = rng.uniform(0.15, 0.85) * s
        y0 = rng.uniform(0.05, 0.5) * s
        ys = np.linspace(y0, min(s - 1.0, y0 + rng.uniform(0.3, 0.55) * s), 40)
        xs = x0 - warp[ys.astype(int), int(x0)] + (warp[int(y0), int(x0)])
        path = draw.jitter(rng, np.stack([ys, xs], 1), 0.6 * s / 128)
        alpha = draw.stroke(s, path, width=rng.uniform(1.4, 2.4) * s / 128)
        image = draw.composite(scene.image, scene.image * 0.22, alpha)
        mask = alpha > 0.3
        return Defect(image, [mask], f"A dark crack runs along the wood grain {draw.location_phrase(mask)}.")

    def _liquid(self, rng, scene: Scene) -> Defect:
        s = scene.size
        radius = rng.uniform(0.07, 0.14) * s
        centre = self.random_point_on(rng, scene.foreground, int(radius))
        alpha = draw.blob(rng, s, centre, radius, wobble=0.4)
        gloss = draw.blob(rng, s, (centre[0] - radius * 0.35, centre[1] - radius * 0.2), radius * 0.25, wobble=0.2)
        image = draw.composite(scene.image, scene.image * 0.62, 0.85 * alpha)
        image = draw.composite(image, np.clip(scene.image * 1.5 + 0.1, 0, 1), 0.5 * gloss * alpha)
        mask = alpha > 0.5
        return Defect(image, [mask], f"A {draw.size_phrase(mask)} liquid stain soaked into the wood {draw.location_phrase(mask)}.")

    def _scratch(self, rng, scene: Scene) -> Defect:
        s = scene.size
        centre = np.array(self.random_point_on(rng, scene.foreground, s // 5))
        angle, length = rng.uniform(0.3, np.pi - 0.3), rng.uniform(0.25, 0.5) * s
        direction = np.array([np.sin(angle), np.cos(angle)])
        path = np.stack([centre - direction * length / 2, centre + direction * length / 2])
        alpha = draw.stroke(s, path, width=rng.uniform(1.2, 2.0) * s / 128)
        image = draw.composite(scene.image, np.clip(scene.image * 1.55 + 0.06, 0, 1), alpha)
        mask = alpha > 0.3
        return Defect(image, [mask], f"A thin light scratch crosses the wood grain {draw.location_phrase(mask)}.")
