"""Split protocols, checked on the real per-defect-type counts of MVTec AD and MVTec LOCO."""
from __future__ import annotations

import json
import shutil

import pytest

from harness.data import read_category
from harness.data.splits import (anomalydiffusion_rule, clean_thirds, dualanodiff_rule, make_split, make_splits,
                                 two_fold_rule, write_manifests)
from harness.errors import ConfigError
from tests.fixtures import shared


def real_counts() -> list[tuple[str, str, str, int]]:
    rows = shared("mvtec_defect_counts.csv").read_text().splitlines()[1:]
    out = [(d, c, t, int(n)) for d, c, t, n in (line.split(",") for line in rows)]
    assert len(out) == 83  # 73 MVTec AD defect types + 10 MVTec LOCO
    return out


def test_anomalydiffusion_rule_puts_exactly_one_image_in_both_parts():
    for *_, n in real_counts():
        parts = anomalydiffusion_rule(n)
        assert parts.train == list(range(n // 3 + 1))  # indices 0..N//3 inclusive
        assert parts.test == list(range(n // 3, n))  # [N//3:]
        assert set(parts.train) & set(parts.test) == {n // 3}
        assert parts.centres == list(range(n // 3))


def test_dualanodiff_rule():
    overlaps = []
    for *_, n in real_counts():
        parts = dualanodiff_rule(n)
        k = n // 3 + (1 if (n // 3) % 3 else 0)
        assert parts.train == list(range(k))
        assert parts.test == list(range(n // 3, n))
        overlaps.append(len(set(parts.train) & set(parts.test)))
        assert overlaps[-1] == (1 if (n // 3) % 3 else 0)
    assert 0 in overlaps and 1 in overlaps  # the rule does put some images in both parts


def test_clean_thirds_never_overlaps():
    for *_, n in real_counts():
        parts = clean_thirds(n)
        assert parts.train == list(range(max(1, n // 3)))
        assert not set(parts.train) & set(parts.test)
        assert sorted(parts.train + parts.test) == list(range(n))
        assert parts.centres == parts.train


def test_two_fold_swaps():
    for *_, n in real_counts():
        a, b = two_fold_rule(n, 0), two_fold_rule(n, 1)
        assert a.train == b.test and a.test == b.train
        assert not set(a.train) & set(a.test)
        assert sorted(a.train + a.test) == list(range(n))


def test_make_split_on_data(synth_root):
    category = read_category(synth_root, "washer")
    split = make_split(category)
    assert split.overlap("crack") == []
    assert [s.key for s in split.defects["crack"].train] == ["test/crack/000", "test/crack/001"]
    assert len(split.normal_train) + len(split.normal_validation) == len(category.train_good)
    assert {s.key for s in split.normal_validation}.isdisjoint({s.key for s in split.normal_train})
    compat = make_split(category, "anomalydiffusion")
    assert compat.overlap("crack") == ["test/crack/002"] and compat.is_compat
    loco = make_split(read_category(synth_root, "tray"))
    assert [s.part for s in loco.normal_validation] == ["validation"] * 3  # LOCO's own validation/good


def test_manifest_hash_tracks_content(synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root / "pill", root / "pill")
    first = make_split(read_category(root, "pill"))
    again = make_split(read_category(root, "pill"))
    assert first.manifest_hash == again.manifest_hash
    assert first.manifest["parts"]["defects"]["crack"]["test"][0] == "test/crack/002"
    image = root / "pill" / "test" / "crack" / "004.png"
    image.write_bytes(image.read_bytes() + b"\0")  # same name, different bytes
    assert make_split(read_category(root, "pill")).manifest_hash != first.manifest_hash
    assert make_split(read_category(root, "pill"), "dualanodiff").manifest_hash != first.manifest_hash


def test_write_manifests_two_folds(synth_root, tmp_path):
    splits = make_splits(read_category(synth_root, "weave"), "two-fold")
    path = write_manifests(splits, tmp_path / "m.json")
    data = json.loads(path.read_text())
    assert [f["fold"] for f in data["folds"]] == [0, 1]
    assert data["folds"][0]["parts"]["defects"]["hole"]["train"] == data["folds"][1]["parts"]["defects"]["hole"]["test"]


def test_unknown_protocol_and_fold(synth_root):
    category = read_category(synth_root, "weave")
    with pytest.raises(ConfigError, match="unknown split protocol"):
        make_split(category, "random")
    with pytest.raises(ConfigError, match="has one fold"):
        make_split(category, "clean-thirds", fold=1)
