"""Readers of the MVTec AD / LOCO / Caption layouts, and one clear error for each kind of bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from harness.data import read_category, read_dataset
from harness.data.captions import JsonCaptions
from harness.data.images import read_image, read_mask
from harness.errors import DataError
from harness.inspection import inspect_dataset


@pytest.fixture
def ad_copy(synth_root, tmp_path):
    """A writable copy of one MVTec AD category and one LOCO category."""
    root = tmp_path / "data"
    for name in ("washer", "tray"):
        shutil.copytree(synth_root / name, root / name)
    return root


def test_reads_mvtec_ad(ad_copy):
    category = read_category(ad_copy, "washer")
    assert category.layout == "mvtec_ad"
    sample = category.defects["crack"][0]
    assert sample.key == "test/crack/000"
    assert sample.masks[0].name == "000_mask.png"
    assert sample.caption and "crack" in sample.caption  # read from prompt/crack/000.txt
    assert sample.load_image(32).shape == (32, 32, 3)
    assert sample.load_mask(32).shape == (32, 32)


def test_loco_masks_are_merged(ad_copy):
    category = read_category(ad_copy, "tray")
    several = [s for s in category.all_samples() if len(s.masks) > 1]
    assert several, "the synthetic LOCO category should have images with several regions"
    sample = several[0]
    union = np.logical_or.reduce([read_mask(p) for p in sample.masks])
    assert np.array_equal(sample.load_mask(), union)
    assert all(read_mask(p).sum() < union.sum() for p in sample.masks)


def test_json_captions(ad_copy, tmp_path):
    captions = {"washer": {"crack": [f"caption {i}" for i in range(6)]}}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(captions))
    category = read_category(ad_copy, "washer", captions=path)
    assert [s.caption for s in category.defects["crack"]] == [f"caption {i}" for i in range(6)]
    assert category.defects["chip"][0].caption is None


def test_grayscale_and_any_size_load_as_rgb(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.arange(30 * 50, dtype=np.uint16).reshape(30, 50).astype(np.uint8)).save(gray)
    jpeg = tmp_path / "c.jpg"
    Image.fromarray(np.full((40, 20, 3), 120, np.uint8)).save(jpeg)
    assert read_image(gray, 16).shape == (16, 16, 3)
    assert read_image(jpeg, 16).shape == (16, 16, 3)
    assert read_image(gray).shape == (30, 50, 3)


# ---- one clear error per kind of bad input -------------------------------------------------------------------


def _expect(root, name, fragment, path_part, **kwargs):
    with pytest.raises(DataError) as info:
        read_category(root, name, **kwargs)
    message = str(info.value)
    assert fragment in message, message
    assert path_part in message, message
    return message


def test_missing_ground_truth_folder(ad_copy):
    shutil.rmtree(ad_copy / "washer" / "ground_truth" / "chip")
    _expect(ad_copy, "washer", "missing ground-truth folder", "ground_truth/chip")


def test_missing_mask(ad_copy):
    (ad_copy / "washer" / "ground_truth" / "crack" / "003_mask.png").unlink()
    _expect(ad_copy, "washer", "missing mask for test/crack/003.png", "003_mask.png")


def test_missing_loco_masks(ad_copy):
    shutil.rmtree(ad_copy / "tray" / "ground_truth" / "logical_anomalies" / "002")
    _expect(ad_copy, "tray", "missing masks for test/logical_anomalies/002.png", "logical_anomalies/002")


def test_mask_size_differs(ad_copy):
    mask = ad_copy / "washer" / "ground_truth" / "stain" / "001_mask.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    _expect(ad_copy, "washer", "mask is 12x10 but its image test/stain/001.png is 64x64", "001_mask.png")


def test_unreadable_image(ad_copy):
    (ad_copy / "washer" / "test" / "chip" / "004.png").write_bytes(b"this is not a png")
    _expect(ad_copy, "washer", "unreadable image", "test/chip/004.png")


def test_truncated_image(ad_copy):
    path = ad_copy / "washer" / "test" / "chip" / "002.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect(ad_copy, "washer", "truncated", "test/chip/002.png", verify=True)
    category = read_category(ad_copy, "washer")  # headers are fine ...
    with pytest.raises(DataError, match="truncated"):  # ... decoding is not
        category.defects["chip"][2].load_image()


def test_defect_folder_without_images(ad_copy):
    (ad_copy / "washer" / "test" / "dent").mkdir()
    (ad_copy / "washer" / "ground_truth" / "dent").mkdir()
    _expect(ad_copy, "washer", "defect folder 'dent' has no images", "test/dent")


def test_defect_image_without_caption(ad_copy):
    (ad_copy / "washer" / "prompt" / "crack" / "005.txt").unlink()
    _expect(ad_copy, "washer", "has no caption", "test/crack/005.png", require_captions=True)
    read_category(ad_copy, "washer")  # fine when captions are not asked for


def test_caption_missing_from_json(ad_copy, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"washer": {"crack": ["only one"]}}))
    message = _expect(ad_copy, "washer", "has no caption", "test/chip/000.png", captions=path, require_captions=True)
    assert str(path) in message


def test_unknown_layout(tmp_path):
    (tmp_path / "root" / "thing" / "train" / "good").mkdir(parents=True)
    _expect(tmp_path / "root", "thing", "unknown layout", "thing")


def test_empty_train_good(ad_copy):
    for path in (ad_copy / "washer" / "train" / "good").iterdir():
        path.unlink()
    _expect(ad_copy, "washer", "no images in train/good", "train/good")


def test_missing_root_and_category(tmp_path, ad_copy):
    with pytest.raises(DataError, match="data set root not found"):
        read_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no such category"):
        read_dataset(ad_copy, ["nope"])
    with pytest.raises(DataError, match="looks like a category folder"):
        read_dataset(ad_copy / "washer")


def test_invalid_caption_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        JsonCaptions(path)


def test_inspect_lists_every_problem(ad_copy):
    (ad_copy / "washer" / "ground_truth" / "crack" / "003_mask.png").unlink()
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(ad_copy / "washer" / "ground_truth" / "stain" / "001_mask.png")
    result = inspect_dataset(ad_copy)
    assert len(result.errors) == 2
    assert any("003_mask.png" in e for e in result.errors) and any("001_mask.png" in e for e in result.errors)
    assert {c.name for c in result.categories} == {"washer", "tray"}
