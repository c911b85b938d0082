"""The synthetic category interface: a normal scene, and defects drawn onto a scene."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Scene:
    """A rendered normal image plus what the defects need to know about it."""

    image: np.ndarray  # float32 (H, W, 3) in [0, 1]
    foreground: np.ndarray  # bool (H, W): where a defect may land
    params: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.image.shape[0]


@dataclass
class Defect:
    image: np.ndarray
    regions: list[np.ndarray]  # one boolean mask per defect region (MVTec AD categories have exactly one)
    caption: str


class SynthCategory:
    """A procedurally generated category. Subclasses draw `normal` and one `_<defect_type>` per defect type."""

    name: str
    layout: str = "mvtec_ad"
    defect_types: tuple[str, ...] = ()

    def normal(self, rng: np.random.Generator, size: int) -> Scene:
        raise NotImplementedError

    def defect(self, defect_type: str, rng: np.random.Generator, scene: Scene) -> Defect:
        """Draw a defect of this type; retried until every region is non-empty and on the foreground."""
        draw = getattr(self, f"_{defect_type}")
        for _ in range(20):
            result = draw(rng, scene)
            regions = [r & scene.foreground for r in result.regions]
            if regions and all(r.sum() >= 4 for r in regions):
                result.regions = regions
                return result
        raise RuntimeError(f"synthetic {self.name}/{defect_type}: could not place a defect on the foreground")

    def random_point_on(self, rng: np.random.Generator, region: np.ndarray, margin: int = 0) -> tuple[float, float]:
        """A random pixel of `region`, at least `margin` pixels from the image border."""
        allowed = region.copy()
        if margin:
            allowed[:margin], allowed[-margin:], allowed[:, :margin], allowed[:, -margin:] = False, False, False, False
        ys, xs = np.nonzero(allowed if allowed.any() else region)
        i = rng.integers(len(ys))
        return float(ys[i]) + 0.5, float(xs[i]) + 0.5
