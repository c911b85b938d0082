"""sPRO, MVTec LOCO's localisation metric: hand cases, the exact curve against the definition at every threshold,
and with full saturation over connected regions it is AUPRO (an independent implementation)."""
from __future__ import annotations

import numpy as np
import pytest

from harness.metrics import detection
from harness.metrics.spro import Region, area_under, au_spro, saturation_area, spro_at, spro_curve


def _one_image() -> tuple[np.ndarray, np.ndarray]:
    """Region pixels score 0.9 and 0.1; the four defect-free pixels 0.5, 0.4, 0.3, 0.2."""
    maps = np.array([[[0.9, 0.1, 0.5], [0.4, 0.3, 0.2]]])
    mask = np.array([[True, True, False], [False, False, False]])
    return maps, mask


def test_saturation_areas_follow_the_official_rule():
    assert saturation_area(10, 0.5, relative=True) == 5
    assert saturation_area(7, 0.5, relative=True) == 3  # truncated
    assert saturation_area(10, 30, relative=False) == 10  # at most the region
    assert saturation_area(10, 3, relative=False) == 3
    assert saturation_area(10, 2.5, relative=False) == 2.5  # an absolute area is never truncated (np.minimum)


def test_hand_cases():
    maps, mask = _one_image()
    # saturated by one pixel: the region's top pixel scores above every defect-free pixel, so sPRO is 1 from FPR 0
    assert au_spro(maps, [Region(0, mask, 1)], 0.05) == pytest.approx(1.0)
    # saturated by its whole area (PRO): half the region until every defect-free pixel is above the threshold
    fpr, spro = spro_curve(maps, [Region(0, mask, 2)])
    assert fpr.tolist() == pytest.approx([0, 0, 0.25, 0.5, 0.75, 1, 1])
    assert spro.tolist() == pytest.approx([0, 0.5, 0.5, 0.5, 0.5, 0.5, 1])
    assert au_spro(maps, [Region(0, mask, 2)], 0.05) == pytest.approx(0.5)
    assert au_spro(maps, [Region(0, mask, 2)], 1.0) == pytest.approx(0.5)
    # two regions are averaged; a second image without regions adds only defect-free pixels
    maps2 = np.concatenate([maps, np.zeros_like(maps)])
    regions = [Region(0, mask, 1), Region(0, mask, 2)]
    assert au_spro(maps2, regions, 0.05) == pytest.approx(0.75)


def test_the_curve_is_the_definition_at_every_threshold():
    rng = np.random.default_rng(0)
    maps = np.round(rng.random((3, 12, 12)), 2)  # rounded: ties between region and defect-free pixels
    regions = []
    for image, (y, x, size, saturation) in enumerate([(2, 2, 4, 5), (6, 5, 5, 25), (1, 7, 3, 2)]):
        mask = np.zeros((12, 12), dtype=bool)
        mask[y:y + size, x:x + size] = True
        maps[image][mask] += 0.3
        regions.append(Region(image, mask, saturation))
    overlap = np.zeros((12, 12), dtype=bool)
    overlap[3:8, 3:8] = True  # overlaps the first region: its shared pixels count for both
    regions.append(Region(0, overlap, 10))
    corner = np.zeros((12, 12), dtype=bool)
    corner[0:4, 0:5] = True
    regions.append(Region(1, corner, 7.5))  # an absolute area scaled to the working resolution: fractional
    fpr, spro = spro_curve(maps, regions)
    distinct = np.unique(maps)[::-1]
    thresholds = np.r_[distinct[1:], distinct[-1] - 1]  # just below each distinct score, descending
    for point, threshold in enumerate(thresholds, start=1):
        assert (fpr[point], spro[point]) == pytest.approx(spro_at(maps, regions, threshold))
    assert (fpr[0], spro[0], fpr[-1], spro[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(spro) >= 0)


def test_full_saturation_over_connected_regions_is_aupro():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[0, 2:6, 2:6] = masks[0, 10:13, 9:15] = masks[1, 5:11, 4:8] = masks[2, 0:3, 0:16] = True
    maps = rng.random(masks.shape) + 0.6 * masks
    from scipy import ndimage

    regions = []
    for image, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))  # AUPRO's regions: 8-connected
        regions += [Region(image, labels == k, int((labels == k).sum())) for k in range(1, count + 1)]
    assert len(regions) == 4
    assert au_spro(maps, regions, 0.3) == pytest.approx(detection.aupro(masks, maps, 0.3))


def test_bad_input_is_named():
    maps, mask = _one_image()
    with pytest.raises(ValueError, match="saturation area of 0"):
        au_spro(maps, [Region(0, mask, 0)])
    with pytest.raises(ValueError, match="at least one"):
        au_spro(maps, [])
    with pytest.raises(ValueError, match="FPR limit"):
        area_under(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.0)


# ---- MVTec LOCO's regions and saturation rules, read from the data ---------------------------------------

def _tray(tmp_path):
    from harness.data.layouts import read_category
    from harness.data.splits import make_split
    from harness.data.synth import SynthConfig, synthesize

    root = tmp_path / "data"
    synthesize(root, SynthConfig(seed=0, size=64, n_train=6, n_validation=2, n_test_good=3, n_defect=6,
                                 categories=("tray",)))
    return root, make_split(read_category(root, "tray", dataset="synthetic"))


def test_regions_carry_their_defect_types_saturation(tmp_path):
    from harness.downstream.data import score_maps, test_regions, test_samples, test_set

    _, split = _tray(tmp_path)
    rules = split.category.saturation
    assert {r.defect_name: (r.threshold, r.relative) for r in rules.values()} == {
        "synthetic_logical": (64.0, False), "synthetic_structural": (1.0, True)}
    loco = test_regions(split, 32)  # half the size: an absolute area counts a quarter of the pixels
    samples = test_samples(split)
    assert loco.missing is None and len(loco.regions) + loco.dropped == sum(len(s.masks) for s in samples)
    for region in loco.regions:
        kind = samples[region.image].defect_type
        area = int(region.mask.sum())
        assert region.saturation == (area if kind == "structural_anomalies" else max(1, min(16, area)))
    # at 20 px the logical regions' 64 pixels scale to 6.25, kept as they are (not truncated to 6)
    logical = [r for r in test_regions(split, 20).regions if samples[r.image].defect_type == "logical_anomalies"]
    assert all(r.saturation == min(6.25, int(r.mask.sum())) for r in logical)
    assert any(r.saturation == 6.25 for r in logical)
    test = test_set(split, 32)
    rng = np.random.default_rng(0)
    maps = rng.random(test.masks.shape) + test.masks  # a detector that sees every defect pixel
    records = {(r["defect_type"], r["metric"]): r for r in score_maps(test, maps, maps.max(axis=(1, 2)), loco=loco)}
    logical, structural = records[("logical_anomalies", "pixel_spro")], records[("structural_anomalies", "pixel_spro")]
    assert logical["value"] == pytest.approx(1.0) and structural["value"] == pytest.approx(1.0)
    assert records[("all", "pixel_spro")]["value"] == pytest.approx((logical["value"] + structural["value"]) / 2)
    blind = score_maps(test, rng.random(test.masks.shape), rng.random(len(test)), loco=loco)
    assert all(r["value"] < 0.2 for r in blind if r["metric"] == "pixel_spro")  # chance: about 0.05 / 2


def test_a_bad_defects_config_or_an_unlisted_pixel_value_is_named(tmp_path):
    import json

    from harness.data.layouts import read_category
    from harness.downstream.data import test_regions
    from harness.errors import DataError

    root, split = _tray(tmp_path)
    config = root / "tray" / "defects_config.json"
    entries = json.loads(config.read_text())
    config.write_text(json.dumps([{**entries[0], "relative_saturation": True, "saturation_threshold": 64}]))
    with pytest.raises(DataError, match="saturation_threshold 64"):
        read_category(root, "tray", dataset="synthetic")
    config.write_text(json.dumps(entries[:1]))  # the structural masks' value is no longer listed
    from harness.data.splits import make_split

    with pytest.raises(DataError, match="pixel value 255 is not listed"):
        test_regions(make_split(read_category(root, "tray", dataset="synthetic")), 32)
    config.unlink()
    missing = test_regions(make_split(read_category(root, "tray", dataset="synthetic")), 32)
    assert missing.missing and "defects_config.json" in missing.missing
