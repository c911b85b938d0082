"""Split protocols: which defect images train the generator, which are test, which are IC-LPIPS centres.

Every protocol sorts the images of a defect type by file id and is deterministic. Per defect type with N images:

- `clean-thirds` (default): train = the first max(1, N//3), test = the rest. No file is in both. The train part
  is also the IC-LPIPS cluster centres.
- `anomalydiffusion`: the published rule of AnomalyDiffusion (Hu et al., AAAI 2024): train = indices 0..N//3
  inclusive, test = [N//3:], so the image N//3 is in both; centres = the first N//3 (their IC-LPIPS script).
- `dualanodiff`: the published rule of DualAnoDiff (Jin et al., CVPR 2025): n = N//3, plus one when n % 3 != 0;
  train = the first n, test = [N//3:] (one image in both whenever n was incremented); centres = the first N//3.
- `two-fold`: the first half (N//2) and the rest swap roles (Cho et al.); fold 0 trains on the first half.

Normal images: train/good trains every model; a validation part for model selection is held out of train/good
(MVTec LOCO's own validation/good where it exists), never taken from test; test/good is test.
A manifest (JSON) lists every part by sample key and carries a content hash over the assignment, the bytes of
every listed file, and the captions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.data.model import Category, Sample
from harness.errors import ConfigError
from harness.registry import Registry
from harness.io import atomic_write_json, cached_file_hash, sha256_json

DEFAULT_PROTOCOL = "clean-thirds"
NORMAL_VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class PartIndices:
    """Index lists into the id-sorted images of one defect type."""

    train: list[int]
    test: list[int]
    centres: list[int]


def clean_thirds(n: int) -> PartIndices:
    k = max(1, n // 3)
    return PartIndices(list(range(k)), list(range(k, n)), list(range(k)))


def anomalydiffusion_rule(n: int) -> PartIndices:
    third = n // 3
    return PartIndices(list(range(min(n, third + 1))), list(range(third, n)), list(range(third)))


def dualanodiff_rule(n: int) -> PartIndices:
    third = n // 3
    k = third + 1 if third % 3 else third
    return PartIndices(list(range(min(n, k))), list(range(third, n)), list(range(third)))


def two_fold_rule(n: int, fold: int) -> PartIndices:
    half = n // 2
    first, second = list(range(half)), list(range(half, n))
    train, test = (first, second) if fold == 0 else (second, first)
    return PartIndices(train, test, list(train))


@dataclass(frozen=True)
class SplitRule:
    """A split protocol: how many folds, which images of a defect type each part takes, and whether it reproduces a
    published protocol (its overlap between parts included)."""

    name: str
    folds: int
    parts: Callable[[int, int], PartIndices]  # (number of images, fold) -> the parts' indices
    compat: bool = False

    def for_fold(self, fold: int) -> Callable[[int], PartIndices]:
        if not 0 <= fold < self.folds:
            folds = "one fold" if self.folds == 1 else f"{self.folds} folds"
            raise ConfigError(f"protocol {self.name!r} has {folds}; fold {fold} does not exist")
        return lambda n: self.parts(n, fold)


SPLIT_RULES: Registry[SplitRule] = Registry("split protocol", SplitRule)
for _rule in (SplitRule("clean-thirds", 1, lambda n, fold: clean_thirds(n)),
              SplitRule("anomalydiffusion", 1, lambda n, fold: anomalydiffusion_rule(n), compat=True),
              SplitRule("dualanodiff", 1, lambda n, fold: dualanodiff_rule(n), compat=True),
              SplitRule("two-fold", 2, two_fold_rule)):
    SPLIT_RULES.add(_rule.name, _rule)
PROTOCOLS = tuple(SPLIT_RULES)
COMPAT_PROTOCOLS = frozenset(name for name, rule in SPLIT_RULES.items() if rule.compat)  # reproduce published rules


def n_folds(protocol: str) -> int:
    return SPLIT_RULES[protocol].folds


def rule_for(protocol: str, fold: int) -> Callable[[int], PartIndices]:
    return SPLIT_RULES[protocol].for_fold(fold)


@dataclass
class DefectParts:
    train: list[Sample]
    test: list[Sample]
    centres: list[Sample]


@dataclass
class Split:
    """One fold of a protocol applied to one category."""

    protocol: str
    fold: int
    category: Category
    defects: dict[str, DefectParts]
    normal_train: list[Sample]
    normal_validation: list[Sample]
    normal_test: list[Sample]
    manifest: dict = field(default_factory=dict)

    @property
    def manifest_hash(self) -> str:
        return self.manifest["hash"]

    @property
    def is_compat(self) -> bool:
        return self.protocol in COMPAT_PROTOCOLS

    def warnings(self) -> list[str]:
        """What this split leaves a defect type without: training images, test images (the FID / KID reference),
        IC-LPIPS centres."""
        out = []
        for defect, parts in self.defects.items():
            n = len(self.category.defects[defect])
            where = f"{self.category.name}/{defect} ({n} images, protocol {self.protocol!r}, fold {self.fold})"
            if not parts.train:
                out.append(f"{where}: no generator-training images, so no method can be fitted on it")
            if not parts.test:
                out.append(f"{where}: no test images, so FID, KID and the downstream test have no reference")
            if not parts.centres:
                out.append(f"{where}: no IC-LPIPS centres, so IC-LPIPS and LPIPS-real cannot be computed")
        return out

    def overlap(self, defect: str) -> list[str]:
        """Keys of images that are in both the train and the test part of a defect type."""
        parts = self.defects[defect]
        test = {s.key for s in parts.test}
        return [s.key for s in parts.train if s.key in test]


def make_split(category: Category, protocol: str = DEFAULT_PROTOCOL, fold: int = 0) -> Split:
    rule = rule_for(protocol, fold)
    defects = {}
    for defect in category.defect_types:
        samples = category.defects[defect]
        idx = rule(len(samples))
        defects[defect] = DefectParts([samples[i] for i in idx.train], [samples[i] for i in idx.test],
                                      [samples[i] for i in idx.centres])
    normal_train, normal_validation = _normal_parts(category)
    split = Split(protocol, fold, category, defects, normal_train, normal_validation, list(category.test_good))
    split.manifest = build_manifest(split)
    return split


def make_splits(category: Category, protocol: str = DEFAULT_PROTOCOL) -> list[Split]:
    """All folds of a protocol (two for `two-fold`, else one)."""
    return [make_split(category, protocol, fold) for fold in range(n_folds(protocol))]


def _normal_parts(category: Category) -> tuple[list[Sample], list[Sample]]:
    if category.validation_good:
        return list(category.train_good), list(category.validation_good)
    n_val = math.ceil(len(category.train_good) * NORMAL_VALIDATION_FRACTION) if len(category.train_good) > 1 else 0
    cut = len(category.train_good) - n_val
    return list(category.train_good[:cut]), list(category.train_good[cut:])


def build_manifest(split: Split) -> dict:
    category = split.category
    parts = {
        "defects": {d: {"train": _keys(p.train), "test": _keys(p.test), "centres": _keys(p.centres)}
                    for d, p in split.defects.items()},
        "normal": {"train": _keys(split.normal_train), "validation": _keys(split.normal_validation),
                   "test": _keys(split.normal_test)},
    }
    listed = _listed_samples(split)
    files = {}
    for sample in listed:
        for path in (sample.image, *sample.masks):
            files[str(path.relative_to(category.root))] = cached_file_hash(path)
    captions = {s.key: s.caption for s in listed if s.caption}
    body = {
        "protocol": split.protocol,
        "fold": split.fold,
        "dataset": category.dataset,
        "category": category.name,
        "layout": category.layout,
        "parts": parts,
        "files": files,
        "captions": captions,
    }
    return {**body, "root": str(category.root), "hash": sha256_json(body)}


def _listed_samples(split: Split) -> list[Sample]:
    seen: dict[str, Sample] = {}
    for sample in [*split.normal_train, *split.normal_validation, *split.normal_test]:
        seen[sample.key] = sample
    for parts in split.defects.values():
        for sample in [*parts.train, *parts.test, *parts.centres]:
            seen[sample.key] = sample
    return list(seen.values())


def _keys(samples: list[Sample]) -> list[str]:
    return [s.key for s in samples]


def write_manifests(splits: list[Split], path: Path) -> Path:
    """One JSON file for all folds of a protocol on one category."""
    first = splits[0]
    atomic_write_json(path, {
        "protocol": first.protocol,
        "dataset": first.category.dataset,
        "category": first.category.name,
        "folds": [s.manifest for s in splits],
        "hash": sha256_json([s.manifest_hash for s in splits]),
    })
    return path
