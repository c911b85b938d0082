"""The real data in ../shared/data: Magnetic-tile, original MVTec AD files, MVTec Caption texts."""
from __future__ import annotations

import json

import numpy as np
import pytest

from harness.data import read_category
from harness.data.captions import PromptFolderCaptions
from harness.errors import DataError
from harness.inspection import inspect_dataset
from tests.fixtures import shared


def test_magnetic_tile_counts_and_empty_masks():
    root = shared("magnetic-tile")
    result = inspect_dataset(root)
    assert result.errors == []
    category = result.categories[0]
    assert category.name == "magnetic_tile"
    assert len(category.train_good) == 800 and len(category.test_good) == 152
    counts = {d: len(s) for d, s in category.defects.items()}
    assert counts == {"blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}
    empty = sorted(w.split("/")[-1].split(":")[0] for w in result.warnings if "mask is empty" in w)
    assert empty == ["050_mask.png", "053_mask.png", "066_mask.png", "067_mask.png"]


def test_magnetic_tile_grayscale_variable_sizes_resize_to_rgb():
    category = read_category(shared("magnetic-tile"), "magnetic_tile")
    samples = category.defects["crack"][:5]
    sizes = {s.load_image().shape[:2] for s in samples}
    assert len(sizes) > 1  # variable sizes on disk
    for sample in samples:
        image, mask = sample.load_image(128), sample.load_mask(128)
        assert image.shape == (128, 128, 3) and mask.shape == (128, 128) and mask.any()
        assert np.array_equal(image[..., 0], image[..., 1])  # grayscale source


MVTEC_SUBSET = {
    "capsule": {"good": 8, "crack": 2, "poke": 3, "scratch": 2, "squeeze": 1},
    "metal_nut": {"good": 8, "bent": 3, "color": 3, "flip": 1, "scratch": 1},
}


@pytest.mark.parametrize("name", sorted(MVTEC_SUBSET))
def test_mvtec_subset_counts(name):
    root = shared("mvtec-ad-subset")
    with pytest.raises(DataError, match="train/good"):  # test split only: no normal training images
        read_category(root, name)
    category = read_category(root, name, require_train=False)
    counts = {d: len(s) for d, s in category.defects.items()} | {"good": len(category.test_good)}
    assert counts == MVTEC_SUBSET[name]
    sample = category.defects[sorted(category.defects)[0]][0]
    assert sample.load_image(256).shape == (256, 256, 3)
    assert sample.load_mask(256).any()


def test_mvtec_caption_json_pairs_with_official_file_names():
    root = shared("mvtec-ad-subset")
    path = shared("mvtec-caption", "mvtec_ad_captions.json")
    captions = json.loads(path.read_text())
    for name in MVTEC_SUBSET:
        category = read_category(root, name, captions=path, require_captions=True, require_train=False)
        for defect, samples in category.defects.items():
            for sample in samples:
                assert sample.caption == captions[name][defect][int(sample.file_id)].strip()
    crack = read_category(root, "capsule", captions=path, require_train=False).defects["crack"]
    assert [s.file_id for s in crack] == ["001", "010"]
    assert crack[0].caption == captions["capsule"]["crack"][1]


def test_prompt_folders_as_the_official_scripts_write_them(tmp_path):
    """Write <category>/prompt/<defect>/NNN.txt from the JSON (as MVTec-Caption's scripts do) and read them back."""
    source = shared("mvtec-ad-subset")
    captions = json.loads(shared("mvtec-caption", "mvtec_ad_captions.json").read_text())
    root = tmp_path / "mvtec"
    (root / "capsule").mkdir(parents=True)
    for part in ("test", "ground_truth"):
        (root / "capsule" / part).symlink_to(source / "capsule" / part)
    for defect, texts in captions["capsule"].items():
        for i, text in enumerate(texts):
            path = root / "capsule" / "prompt" / defect / f"{i:03d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    category = read_category(root, "capsule", captions=PromptFolderCaptions(), require_captions=True, require_train=False)
    by_json = read_category(source, "capsule", captions=shared("mvtec-caption", "mvtec_ad_captions.json"), require_train=False)
    assert [s.caption for d in category.defect_types for s in category.defects[d]] == \
           [s.caption for d in by_json.defect_types for s in by_json.defects[d]]


def test_loco_captions_cover_the_official_counts():
    counts = {}
    for line in shared("mvtec_defect_counts.csv").read_text().splitlines()[1:]:
        dataset, category, defect, n = line.split(",")
        counts[(dataset, category, defect)] = int(n)
    loco = json.loads(shared("mvtec-caption", "mvtec_loco_captions.json").read_text())
    for category, defects in loco.items():
        for defect, texts in defects.items():
            assert len(texts) == counts[("mvtec_loco", category, defect)]
