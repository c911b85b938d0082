"""The shipped tiny backbone's pretraining corpus: procedural captioned scenes with a general visual vocabulary, and
the normal training images of the synthetic data set's categories.

Stable Diffusion knows colours, shapes, materials and marks before a method fine-tunes it few-shot; a backbone
trained on five categories' normal images alone knows five prompts, so textual inversion has nothing to invert
into. The generic scenes give the tiny backbone that vocabulary: surfaces of a material or pattern in a colour,
objects (shapes) on such surfaces, and marks (scratches, spots, stains, cracks, dots, streaks) on them, each
captioned from what was drawn ("a photo of a small red circle in the upper left on a grey metal surface").

No defect image enters it: the synthetic categories contribute their normal training images only (the split's
`normal_train`, read from the data set's files, so a run can tell by content hash that the backbone has seen them),
and marks are drawn by this module on generic surfaces, never on a benchmark category's image and never by the
synthetic data set's defect code. A few-shot method learns the benchmark's defects from its few shots.

Deterministic from the config: scene i is drawn from the stream (seed, i).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np

from harness.data.synth import draw

CORPUS_VERSION = 1  # bump when a drawing or a caption rule changes: the shipped backbone records it

COLOURS = {
    "red": (0.80, 0.16, 0.13), "orange": (0.95, 0.55, 0.12), "yellow": (0.93, 0.83, 0.20),
    "green": (0.20, 0.60, 0.25), "teal": (0.15, 0.50, 0.52), "blue": (0.18, 0.30, 0.80),
    "purple": (0.50, 0.22, 0.65), "pink": (0.95, 0.55, 0.70), "brown": (0.50, 0.30, 0.15),
    "black": (0.07, 0.07, 0.08), "white": (0.94, 0.94, 0.92), "grey": (0.55, 0.55, 0.57),
    "cream": (0.93, 0.87, 0.70),
}
SURFACES = ("plain", "metal", "wood", "fabric", "stone", "paper", "plastic", "carpet", "tiled", "striped",
            "checkered", "dotted")
SHAPES = ("circle", "square", "triangle", "ring", "star", "bar", "cross", "oval", "hexagon")
MARKS = ("scratch", "spot", "stain", "crack", "dots", "streak")
SIZES = ("small", "large")
TONES = {"dark": 0.45, "light": 1.5}  # a mark darkens or lightens the surface beneath it
GLUE = ("a", "an", "photo", "of", "on", "with", "and", "surface", "in", "the", "upper", "lower", "left", "right",
        "centre", "part")
SCENE_KINDS = {"surface": 0.3, "objects": 0.4, "marks": 0.3}


@dataclass(frozen=True)
class CorpusConfig:
    seed: int = 0
    size: int = 128
    generic: int = 3000  # procedural captioned scenes
    synth_seed: int = 0  # the synthetic data set (harness/data/synth) whose normal training images join
    categories: tuple[str, ...] = ("weave", "grain", "washer", "pill", "tray")
    photo_rate: float = 0.7  # captions that start with "a photo of", as the category prompts do


@dataclass
class Corpus:
    images: np.ndarray  # uint8 (N, size, size, 3)
    captions: list[str]
    sources: list[str]  # "generic", or the category an image is a normal image of
    normal_hashes: dict[str, list[str]] = field(default_factory=dict)  # category -> SHA-256 of its files

    def __len__(self) -> int:
        return len(self.captions)


def vocabulary(categories: tuple[str, ...] = CorpusConfig.categories) -> list[str]:
    """Every word a corpus caption can hold (the tiny tokenizer's vocabulary beyond its reserved words)."""
    from harness.diffusion.backbone import split_words

    words = {*COLOURS, *SURFACES, *SHAPES, *MARKS, *SIZES, *TONES, *GLUE}
    words.update(w for c in categories for w in split_words(c))
    return sorted(words)


def corpus_id(config: CorpusConfig) -> str:
    """The corpus's name: its settings and CORPUS_VERSION, hashed (its content is hashed in shipped.corpus_record)."""
    payload = repr(sorted({**asdict(config), "version": CORPUS_VERSION}.items()))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build(config: CorpusConfig = CorpusConfig(), progress: bool = False) -> Corpus:
    """The corpus: `config.generic` procedural scenes, then every synthetic category's normal training images."""
    images, captions = generic_scenes(config, config.generic, progress)
    images, sources = list(images), ["generic"] * len(captions)
    normals, hashes = synthetic_normals(config)
    for category, (arrays, prompt) in normals.items():
        images += arrays
        captions += [prompt] * len(arrays)
        sources += [category] * len(arrays)
    return Corpus(np.stack(images), captions, sources, hashes)


def generic_scenes(config: CorpusConfig, count: int, progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """The corpus's first `count` generic scenes (uint8 (count, size, size, 3)) and their captions."""
    from tqdm.auto import tqdm

    drawn = [generic_scene(np.random.default_rng([config.seed, i]), config.size, config.photo_rate)
             for i in tqdm(range(count), desc="corpus", disable=not progress, leave=False)]
    if not drawn:
        return np.zeros((0, config.size, config.size, 3), np.uint8), []
    return np.stack([image for image, _ in drawn]), [caption for _, caption in drawn]


def synthetic_splits(categories: tuple[str, ...], synth_seed: int = 0) -> dict:
    """The default split of each synthetic category of the synthetic data set of `synth_seed` (as a run makes it)."""
    from harness.data import synth
    from harness.data.layouts import read_category
    from harness.data.splits import make_split

    root = synth.cached(synth.SynthConfig(seed=synth_seed))
    return {name: make_split(read_category(root, name, dataset="synthetic")) for name in categories}


def synthetic_normals(config: CorpusConfig) -> tuple[dict[str, tuple[list[np.ndarray], str]], dict[str, list[str]]]:
    """The normal training images (the default split's `normal_train`) of each synthetic category, read from the
    synthetic data set's files at config.size, with their prompts and their files' hashes."""
    from harness.data.images import read_image
    from harness.diffusion.pretrain import prompt_for
    from harness.io import sha256_file

    normals, hashes = {}, {}
    for category, split in synthetic_splits(config.categories, config.synth_seed).items():
        paths = [sample.image for sample in split.normal_train]
        normals[category] = ([read_image(p, config.size) for p in paths], prompt_for(category))
        hashes[category] = [sha256_file(p) for p in paths]
    return normals, hashes


# --- one generic scene -------------------------------------------------------------------------------------


def generic_scene(rng: np.random.Generator, size: int, photo_rate: float = 0.7) -> tuple[np.ndarray, str]:
    """A uint8 (size, size, 3) scene and its caption."""
    kind = rng.choice(list(SCENE_KINDS), p=list(SCENE_KINDS.values()))
    colour = _colour_name(rng)
    surface = SURFACES[rng.integers(len(SURFACES))]
    image = _surface(rng, surface, np.array(COLOURS[colour], np.float32), size)
    place = f"{colour} {surface} surface"
    if kind == "surface":
        text = place
    elif kind == "objects":
        image, things = _objects(rng, image, colour, size)
        text = f"{things} on {with_article(place)}"
    else:
        image, marks = _marks(rng, image, size)
        text = f"{place} with {marks}"
    caption = f"a photo of {with_article(text)}" if rng.random() < photo_rate else with_article(text)
    return draw.to_uint8(np.clip(image, 0, 1)), caption


def with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _colour_name(rng: np.random.Generator, avoid: str | None = None) -> str:
    names = [c for c in COLOURS if c != avoid]
    return names[rng.integers(len(names))]


def _surface(rng: np.random.Generator, kind: str, colour: np.ndarray, size: int) -> np.ndarray:
    """A (size, size, 3) float surface of `kind` in `colour`, lit by a gentle gradient."""
    y, x = draw.coords(size)
    s = size / 128
    noise = lambda cells: draw.smooth_noise(rng, size, cells)  # noqa: E731
    if kind == "plain":
        shade = 1 + 0.03 * noise(3)
    elif kind == "metal":  # brushed: fine streaks along one axis
        streaks = noise((60, 2)) if rng.random() < 0.5 else noise((2, 60))
        shade = 0.9 + 0.06 * streaks + 0.08 * np.cos(2 * np.pi * (x + y) / (size * rng.uniform(1, 3)))
    elif kind == "wood":
        warp = noise((3, 2)) * 5 * s
        shade = 0.85 + 0.12 * np.sin(2 * np.pi * (x + warp) / (rng.uniform(8, 16) * s)) + 0.05 * noise((3, 40))
    elif kind == "fabric":
        period = rng.uniform(6, 12) * s
        warp_, weft = np.sin(2 * np.pi * x / period), np.sin(2 * np.pi * y / period)
        checker = (np.floor(x / period) + np.floor(y / period)) % 2 == 0
        shade = 0.85 + 0.15 * np.where(checker, warp_, weft)
    elif kind == "stone":
        shade = 0.85 + 0.08 * noise(4) + 0.05 * noise(12) + 0.04 * noise(40)
    elif kind == "paper":
        shade = 1 + 0.02 * noise(30) + 0.02 * noise(5)
    elif kind == "plastic":  # glossy: a soft highlight
        cy, cx = rng.uniform(0, size, 2)
        shade = 0.85 + 0.35 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (0.3 * size) ** 2))
    elif kind == "carpet":
        shade = 0.85 + 0.15 * rng.standard_normal((size, size)).astype(np.float32) * 0.6 + 0.05 * noise(6)
    elif kind == "tiled":
        period = rng.uniform(16, 40) * s
        grout = (np.minimum((x % period), (y % period)) < 1.5 * s)
        shade = np.where(grout, 0.55, 1 + 0.03 * noise(6))
    elif kind == "striped":
        period, angle = rng.uniform(8, 24) * s, rng.choice([0, np.pi / 2, np.pi / 4])
        shade = np.where(np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period) > 0, 1.0, 0.6)
    elif kind == "checkered":
        period = rng.uniform(10, 32) * s
        shade = np.where((np.floor(x / period) + np.floor(y / period)) % 2 == 0, 1.0, 0.6)
    elif kind == "dotted":
        period = rng.uniform(10, 24) * s
        d = np.hypot((x % period) - period / 2, (y % period) - period / 2)
        shade = np.where(d < period * 0.22, 0.6, 1.0)
    else:
        raise ValueError(f"unknown surface {kind!r}")
    light = 1 + 0.06 * np.cos(2 * np.pi * (x * np.cos(a := rng.uniform(0, 2 * np.pi)) + y * np.sin(a)) / (2 * size))
    tint = colour * rng.uniform(0.9, 1.1) * (1 + rng.normal(0, 0.03, 3)).astype(np.float32)
    pixel = draw.pixel_noise(rng, size, 0.012)
    return (tint * (shade * light)[..., None] + pixel).astype(np.float32)


def _position(rng: np.random.Generator, size: int, radius: float) -> tuple[float, float]:
    margin = min(radius + 2, size / 2 - 1)
    return tuple(rng.uniform(margin, size - margin, 2))


def position_phrase(cy: float, cx: float, size: int) -> str:
    """'in the upper left', 'in the centre', 'on the right', ... of a point."""
    row = ("upper", "", "lower")[min(2, int(3 * cy / size))]
    col = ("left", "", "right")[min(2, int(3 * cx / size))]
    if not row and not col:
        return "in the centre"
    if not row:
        return f"on the {col}"
    if not col:
        return f"in the {row} part"
    return f"in the {row} {col}"


def _shape_alpha(rng: np.random.Generator, shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = draw.coords(size)
    angle = rng.uniform(0, 2 * np.pi)

    def regular(n: int, radii: tuple[float, ...] = (1.0,)) -> np.ndarray:
        k = np.arange(n * len(radii))
        rho = r * np.array(radii * n)
        theta = angle + 2 * np.pi * k / len(k)
        return draw.polygon(size, np.stack([cy + rho * np.sin(theta), cx + rho * np.cos(theta)], 1))

    if shape == "circle":
        return np.clip(r - np.hypot(y - cy, x - cx) + 0.5, 0, 1)
    if shape == "ring":
        d = np.hypot(y - cy, x - cx)
        return np.clip(r - d + 0.5, 0, 1) * np.clip(d - 0.55 * r + 0.5, 0, 1)
    if shape == "oval":
        u, v = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle), -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
        return np.clip((1 - np.hypot(u / r, v / (0.55 * r))) * 0.55 * r + 0.5, 0, 1)
    if shape == "square":
        return regular(4)
    if shape == "triangle":
        return regular(3)
    if shape == "hexagon":
        return regular(6)
    if shape == "star":
        return regular(5, (1.0, 0.45))
    if shape in ("bar", "cross"):
        u, v = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle), -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
        bar = np.clip(r - np.abs(u) + 0.5, 0, 1) * np.clip(0.3 * r - np.abs(v) + 0.5, 0, 1)
        if shape == "bar":
            return bar
        other = np.clip(r - np.abs(v) + 0.5, 0, 1) * np.clip(0.3 * r - np.abs(u) + 0.5, 0, 1)
        return np.maximum(bar, other)
    raise ValueError(f"unknown shape {shape!r}")


def _objects(rng: np.random.Generator, image: np.ndarray, background: str, size: int) -> tuple[np.ndarray, str]:
    """One or two shapes in colours other than the background's; their phrase."""
    phrases = []
    for _ in range(1 if rng.random() < 0.7 else 2):
        shape, name = SHAPES[rng.integers(len(SHAPES))], _colour_name(rng, avoid=background)
        big = rng.random() < 0.5
        radius = rng.uniform(0.22, 0.34) * size if big else rng.uniform(0.08, 0.14) * size
        cy, cx = _position(rng, size, radius)
        alpha = _shape_alpha(rng, shape, size, cy, cx, radius)
        y, x = draw.coords(size)
        light = 1 + 0.15 * ((cx - x) + (cy - y)) / (2 * radius) if rng.random() < 0.5 else 1.0  # shaded or flat
        body = np.array(COLOURS[name], np.float32) * rng.uniform(0.9, 1.1) * np.asarray(light, np.float32)[..., None]
        image = draw.composite(image, body + draw.pixel_noise(rng, size, 0.01), alpha)
        phrases.append(f"{SIZES[int(big)]} {name} {shape} {position_phrase(cy, cx, size)}")
    return image, " and ".join([phrases[0], *(with_article(p) for p in phrases[1:])])


def _marks(rng: np.random.Generator, image: np.ndarray, size: int) -> tuple[np.ndarray, str]:
    """One mark (or a group of dots) that darkens or lightens the surface; its phrase."""
    mark, tone = MARKS[rng.integers(len(MARKS))], list(TONES)[rng.integers(len(TONES))]
    big = rng.random() < 0.5
    s = size / 128
    cy, cx = _position(rng, size, 0.2 * size)
    if mark == "scratch":
        angle, length = rng.uniform(0, np.pi), (rng.uniform(0.4, 0.7) if big else rng.uniform(0.15, 0.3)) * size
        d = np.array([np.sin(angle), np.cos(angle)])
        alpha = draw.stroke(size, np.stack([(cy, cx) - d * length / 2, (cy, cx) + d * length / 2]), rng.uniform(1, 2) * s)
    elif mark == "crack":
        path = draw.wander(rng, (cy, cx), rng.uniform(0, 2 * np.pi), (0.5 if big else 0.25) * size, 2 * s, 0.5)
        alpha = draw.stroke(size, draw.jitter(rng, path, 0.8 * s), rng.uniform(1, 2) * s)
    elif mark == "spot":
        alpha = draw.blob(rng, size, (cy, cx), (rng.uniform(6, 10) if big else rng.uniform(2.5, 5)) * s, wobble=0.1)
    elif mark == "stain":
        radius = (rng.uniform(0.12, 0.2) if big else rng.uniform(0.05, 0.1)) * size
        alpha = 0.8 * np.clip(draw.blob(rng, size, (cy, cx), radius, wobble=0.45) * 1.0, 0, 1)
    elif mark == "dots":
        alpha = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(3, 9)):
            centre = (cy + rng.normal(0, 0.1 * size), cx + rng.normal(0, 0.1 * size))
            alpha = np.maximum(alpha, draw.blob(rng, size, centre, rng.uniform(1.5, 3.5) * s, wobble=0.1))
    elif mark == "streak":
        angle, length = rng.uniform(0, np.pi), (0.7 if big else 0.35) * size
        d = np.array([np.sin(angle), np.cos(angle)])
        alpha = 0.7 * draw.stroke(size, np.stack([(cy, cx) - d * length / 2, (cy, cx) + d * length / 2]),
                                  rng.uniform(5, 9) * s)
    else:
        raise ValueError(f"unknown mark {mark!r}")
    layer = np.clip(image * TONES[tone] + (0.08 if tone == "light" else 0.0), 0, 1)
    phrase = f"{SIZES[int(big)]} {tone} {mark} {position_phrase(cy, cx, size)}"
    if mark != "dots":
        phrase = with_article(phrase)
    return draw.composite(image, layer, alpha), phrase
