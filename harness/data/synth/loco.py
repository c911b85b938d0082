"""A synthetic MVTec LOCO category: a tray that must hold one orange and one green disc and three blue pegs.

Logical anomalies break that rule (a component missing, an extra one, one in the wrong colour); structural
anomalies damage the tray or a component. Images with several anomalous regions get one mask per region.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from harness.data.synth import draw
from harness.data.synth.base import Defect, Scene, SynthCategory

COLOURS = {
    "orange": np.array([0.95, 0.55, 0.12], np.float32),
    "green": np.array([0.22, 0.62, 0.26], np.float32),
    "blue": np.array([0.20, 0.30, 0.80], np.float32),
    "purple": np.array([0.58, 0.22, 0.68], np.float32),
    "yellow": np.array([0.93, 0.85, 0.18], np.float32),
}
TRAY = np.array([0.86, 0.78, 0.60], np.float32)
BACKGROUND = np.array([0.78, 0.79, 0.81], np.float32)


@dataclass(frozen=True)
class Component:
    kind: str  # "disc" | "peg"
    colour: str
    alpha: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def _peg(size: int, cy: float, cx: float, half_h: float, half_w: float) -> np.ndarray:
    corners = np.array([[cy - half_h, cx - half_w], [cy - half_h, cx + half_w],
                        [cy + half_h, cx + half_w], [cy + half_h, cx - half_w]], np.float32)
    return draw.polygon(size, corners)


class Tray(SynthCategory):
    name = "tray"
    layout = "mvtec_loco"
    defect_types = ("logical_anomalies", "structural_anomalies")

    def normal(self, rng: np.random.Generator, size: int) -> Scene:
        s = size
        top, bottom = (0.12 + rng.uniform(-0.02, 0.02)) * s, (0.88 + rng.uniform(-0.02, 0.02)) * s
        left, right = (0.07 + rng.uniform(-0.02, 0.02)) * s, (0.93 + rng.uniform(-0.02, 0.02)) * s
        tray = draw.polygon(s, np.array([[top, left], [top, right], [bottom, right], [bottom, left]], np.float32))
        mid = (left + right) / 2 + rng.uniform(-0.01, 0.01) * s
        height = bottom - top
        disc_x = (left + mid) / 2
        discs = [Component("disc", colour, draw.blob(rng, s, (top + f * height + rng.normal(0, 0.01 * s),
                                                             disc_x + rng.normal(0, 0.01 * s)), 0.1 * s, wobble=0.02))
                 for colour, f in (("orange", 0.3), ("green", 0.7))]
        peg_top = top + 0.12 * height
        pegs = [Component("peg", "blue", _peg(s, peg_top + 0.2 * height + rng.normal(0, 0.01 * s),
                                               mid + f * (right - mid) + rng.normal(0, 0.008 * s), 0.18 * height, 0.035 * s))
                for f in (0.25, 0.5, 0.75)]
        params = {
            "tray": tray, "mid": mid, "bounds": (top, bottom, left, right),
            "background": BACKGROUND + draw.pixel_noise(rng, s, 0.008),
            "tray_shade": 0.93 + 0.04 * draw.smooth_noise(rng, s, 3)[..., None] + draw.pixel_noise(rng, s, 0.01),
            "components": discs + pegs,
        }
        image = self.render(params, params["components"])
        return Scene(image, tray > 0.5, params)

    def render(self, params: dict, components: list[Component]) -> np.ndarray:
        s = params["tray"].shape[0]
        image = draw.composite(params["background"], TRAY * params["tray_shade"], params["tray"])
        divider = draw.stroke(s, np.array([[params["bounds"][0], params["mid"]], [params["bounds"][1], params["mid"]]]),
                              1.5 * s / 128) * params["tray"]
        image = draw.composite(image, image * 0.75, divider)
        for component in components:
            shade = 0.85 + 0.15 * component.alpha[..., None]
            image = draw.composite(image, COLOURS[component.colour] * shade * params["tray_shade"], component.alpha)
        return np.clip(image, 0, 1).astype(np.float32)

    # ---- logical anomalies: the right parts, in the wrong number or colour -------------------------------
    def _logical_anomalies(self, rng, scene: Scene) -> Defect:
        p = scene.params
        components = list(p["components"])
        regions, phrases = [], []
        kinds = rng.choice(["missing", "extra", "colour"], size=1 + int(rng.random() < 0.3), replace=False)
        targets = rng.permutation(len(components))
        for kind, index in zip(kinds, targets):
            target = components[index]
            if kind == "missing":
                components[index] = replace(target, alpha=np.zeros_like(target.alpha))
                regions.append(target.alpha > 0.5)
                phrases.append(f"the {target.name} is missing" if target.kind == "disc" else "one of the blue pegs is missing")
            elif kind == "colour":
                wrong = rng.choice([c for c in ("purple", "yellow") if c != target.colour])
                components[index] = replace(target, colour=str(wrong))
                regions.append(target.alpha > 0.5)
                phrases.append(f"a {target.kind} that should be {target.colour} is {wrong}")
            else:
                extra = self._extra_peg(rng, scene)
                components.append(extra)
                regions.append(extra.alpha > 0.5)
                phrases.append("there is an extra blue peg in the right compartment")
        caption = "The tray content is wrong: " + " and ".join(phrases) + "."
        return Defect(self.render(p, components), regions, caption)

    def _extra_peg(self, rng, scene: Scene) -> Component:
        top, bottom, _, right = scene.params["bounds"]
        mid, s = scene.params["mid"], scene.size
        cy = bottom - 0.14 * (bottom - top) + rng.normal(0, 0.01 * s)
        cx = (mid + right) / 2 + rng.normal(0, 0.02 * s)
        return Component("peg", "blue", _peg(s, cy, cx, 0.035 * s, 0.16 * (bottom - top)))

    # ---- structural anomalies: damage to the tray or a component --------------------------------------
    def _structural_anomalies(self, rng, scene: Scene) -> Defect:
        image = scene.image
        regions, phrases = [], []
        kinds = rng.choice(["scratch", "broken", "dent"], size=1 + int(rng.random() < 0.35), replace=False)
        for kind in kinds:
            image, region, phrase = getattr(self, f"_structural_{kind}")(rng, scene, image)
            regions.append(region)
            phrases.append(phrase)
        return Defect(image, regions, "The tray is damaged: " + " and ".join(phrases) + ".")

    def _free_tray(self, scene: Scene) -> np.ndarray:
        occupied = np.max([c.alpha for c in scene.params["components"]], axis=0)
        return (scene.params["tray"] > 0.99) & (occupied < 0.01)

    def _structural_scratch(self, rng, scene: Scene, image: np.ndarray):
        s, free = scene.size, self._free_tray(scene)
        start = self.random_point_on(rng, free, s // 6)
        path = draw.wander(rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.3) * s, step=2.0 * s / 128, turn=0.1)
        alpha = draw.stroke(s, path, 1.5 * s / 128) * free
        region = alpha > 0.3
        return draw.composite(image, image * 0.55, alpha), region, f"a scratch {draw.location_phrase(region)} of the tray"

    def _structural_broken(self, rng, scene: Scene, image: np.ndarray):
        s = scene.size
        component = scene.params["components"][rng.integers(len(scene.params["components"]))]
        edge = (component.alpha > 0.5) & (component.alpha < 0.99) if component.kind == "disc" else component.alpha > 0.5
        centre = self.random_point_on(rng, edge if edge.any() else component.alpha > 0.5)
        bite = draw.blob(rng, s, centre, rng.uniform(0.03, 0.05) * s, wobble=0.4) * component.alpha
        surface = TRAY * scene.params["tray_shade"]
        region = bite > 0.5
        return draw.composite(image, surface, bite), region, f"a piece of the {component.name} is broken off"

    def _structural_dent(self, rng, scene: Scene, image: np.ndarray):
        s, free = scene.size, self._free_tray(scene)
        alpha = draw.blob(rng, s, self.random_point_on(rng, free, s // 8), rng.uniform(0.03, 0.05) * s, wobble=0.35) * free
        region = alpha > 0.5
        return draw.composite(image, image * 0.7, alpha), region, f"a dent {draw.location_phrase(region)} of the tray"
