"""The synthetic data set: layouts, determinism, and defects whose look depends on the background."""
from __future__ import annotations

import colorsys
import hashlib

import numpy as np
import pytest
from scipy import ndimage

from harness.data import read_category
from harness.data.synth import CATEGORIES, SynthConfig, synthesize
from harness.data.synth.loco import Tray
from harness.data.synth.objects import Pill, Washer
from harness.data.synth.textures import Grain, Weave


def _digest(root):
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_layout_counts_and_captions(synth_root):
    assert sorted(p.name for p in synth_root.iterdir() if p.is_dir()) == sorted(CATEGORIES)
    textures, objects = 0, 0
    for name, synth in CATEGORIES.items():
        category = read_category(synth_root, name, require_captions=True)
        assert category.layout == synth.layout
        assert len(category.train_good) == 12 and len(category.test_good) == 4
        assert category.defect_types == sorted(synth.defect_types)
        assert len(synth.defect_types) >= 2 if synth.layout == "mvtec_loco" else len(synth.defect_types) >= 3
        for samples in category.defects.values():
            assert len(samples) == 6
            assert all(s.caption and len(s.caption) > 10 for s in samples)
            assert all(s.load_mask().any() for s in samples)
        textures += category.texture is True
        objects += category.texture is False
    assert textures >= 2 and objects >= 2


def test_loco_category_has_logical_and_structural_with_several_masks():
    root_cat = Tray()
    several = 0
    for i in range(30):
        rng = np.random.default_rng([1, i])
        scene = root_cat.normal(rng, 96)
        for defect in root_cat.defect_types:
            result = root_cat.defect(defect, rng, scene)
            several += len(result.regions) > 1
    assert several > 0


def test_loco_layout_on_disk(synth_root):
    category = read_category(synth_root, "tray")
    assert category.layout == "mvtec_loco"
    assert len(category.validation_good) == 3
    assert {s.kind for s in category.defects["logical_anomalies"]} == {"logical"}
    assert {s.kind for s in category.defects["structural_anomalies"]} == {"structural"}
    for sample in category.defects["logical_anomalies"]:
        assert all(p.parent.name == sample.file_id for p in sample.masks)


def test_deterministic_per_seed(tmp_path):
    config = SynthConfig(seed=3, size=48, n_train=3, n_validation=2, n_test_good=2, n_defect=2)
    a, b = synthesize(tmp_path / "a", config), synthesize(tmp_path / "b", config)
    c = synthesize(tmp_path / "c", SynthConfig(seed=4, size=48, n_train=3, n_validation=2, n_test_good=2, n_defect=2))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_existing_output_is_not_touched(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        synthesize(out, SynthConfig(size=48, n_train=1, n_test_good=1, n_defect=1))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _hue(rgb):
    return colorsys.rgb_to_hsv(*np.clip(rgb, 1e-6, 1))[0]


@pytest.mark.parametrize("category,defect", [(Weave(), "stain"), (Grain(), "liquid"), (Washer(), "stain")])
def test_stains_take_the_surface_hue(category, defect):
    """Inside a stain the colour is darker but its hue stays the surface's hue."""
    for i in range(5):
        rng = np.random.default_rng([2, i])
        scene = category.normal(rng, 128)
        result = category.defect(defect, rng, scene)
        mask = result.regions[0]
        inner = ndimage.binary_erosion(mask, iterations=1)
        ring = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(mask, iterations=1) & scene.foreground
        stain, surface = result.image[inner].mean(0), result.image[ring].mean(0)
        assert stain.sum() < surface.sum()  # darker
        if np.ptp(surface) > 0.1:  # coloured surfaces: same hue
            assert abs(_hue(stain) - _hue(surface)) < 0.04


def test_washer_crack_follows_the_outline():
    category = Washer()
    for i in range(5):
        rng = np.random.default_rng([3, i])
        scene = category.normal(rng, 128)
        result = category.defect("crack", rng, scene)
        ys, xs = np.nonzero(result.regions[0])
        cy, cx = scene.params["centre"]
        radius = np.hypot(ys + 0.5 - cy, xs + 0.5 - cx)
        outer = scene.params["outer"]
        assert np.all(radius > outer - 0.075 * 128) and np.all(radius <= outer + 1)


@pytest.mark.parametrize("category", [Washer(), Pill()])
def test_defects_never_land_off_the_object(category):
    """Every defect pixel is on the object (the rendered object is not the background colour)."""
    for defect in category.defect_types:
        for i in range(4):
            rng = np.random.default_rng([4, i])
            scene = category.normal(rng, 128)
            result = category.defect(defect, rng, scene)
            mask = np.logical_or.reduce(result.regions)
            distance_to_background = np.linalg.norm(scene.image - category.background, axis=2)
            assert np.all(distance_to_background[mask] > 0.1), defect


def test_chip_shows_the_background():
    category = Washer()
    rng = np.random.default_rng(5)
    scene = category.normal(rng, 128)
    result = category.defect("chip", rng, scene)
    inner = ndimage.binary_erosion(result.regions[0])
    assert np.linalg.norm(result.image[inner].mean(0) - category.background) < 0.08
