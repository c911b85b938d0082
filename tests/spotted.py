"""SpottedWeave: a test category whose two defect types differ only in colour, on shared masks. The claim tests of
AnomalyDiffusion (e_a carries its defect type) and AnomalyXFusion (the caption carries the colour) use it: the mask
cannot say which colour to draw, so only the part under test can."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.data.synth import draw
from harness.data.synth.base import Defect
from harness.data.synth.textures import Weave


class SpottedWeave(Weave):
    """Weave with dark and pale stains, captioned alike but for the colour word. The i-th dark and the i-th pale
    stain have one mask (its blob drawn from the index alone, on each one's own normal image)."""

    name = "spotted_weave"
    defect_types = ("dark", "pale")

    def __init__(self):
        self.drawn = dict.fromkeys(self.defect_types, 0)

    def _stain(self, scene, colour: str, layer: np.ndarray):
        index, self.drawn[colour] = self.drawn[colour], self.drawn[colour] + 1
        shape, s = np.random.default_rng([7, index]), scene.size
        radius = shape.uniform(0.06, 0.13) * s
        alpha = draw.blob(shape, s, self.random_point_on(shape, scene.foreground, int(radius)), radius, wobble=0.35)
        mask = alpha > 0.5
        return Defect(draw.composite(scene.image, layer, 0.9 * alpha), [mask],
                      f"A {draw.size_phrase(mask)} {colour} stain {draw.location_phrase(mask)} of the woven fabric.")

    def _dark(self, rng, scene):
        return self._stain(scene, "dark", scene.image * 0.45)

    def _pale(self, rng, scene):
        return self._stain(scene, "pale", np.clip(scene.image * 1.6 + 0.08, 0, 1))


COLOURS = list(SpottedWeave.defect_types)


def spotted_split(root: Path, size: int, n_defect: int = 18):
    """SpottedWeave written at `size` px (`n_defect` stains of each colour) and its default split (a third of the
    stains of each colour for training)."""
    from harness.data.layouts import read_category
    from harness.data.splits import make_split
    from harness.data.synth import SynthConfig, write_category

    write_category(root / SpottedWeave.name, SpottedWeave(), 7,
                   SynthConfig(seed=0, size=size, n_train=12, n_test_good=4, n_defect=n_defect))
    return make_split(read_category(root, SpottedWeave.name, dataset="synthetic"))
