"""Readers for the MVTec AD and MVTec LOCO layouts (with MVTec Caption texts where present).

MVTec AD:   <cat>/train/good, <cat>/test/<defect>/NNN.png, <cat>/ground_truth/<defect>/NNN_mask.png
MVTec LOCO: <cat>/train/good, <cat>/validation/good, <cat>/test/{good,logical_anomalies,structural_anomalies},
            <cat>/ground_truth/<anomaly>/NNN/000.png, 001.png, ... (one mask per defect region, merged on load)

Reading checks the structure and the image headers (sizes), not the pixels; `verify=True` also decodes every
file, which is what `defectbench inspect` does. In strict mode the first problem raises a DataError naming the
file; otherwise problems are collected and the offending samples skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from harness.data.captions import CaptionSource, JsonCaptions, caption_source
from harness.data.images import GRAYSCALE_MODES, image_header, image_size, is_image_file, read_mask, verify_image
from harness.data.model import DEFECTS_CONFIG, GOOD, Category, SaturationRule, Sample, file_id_sort_key
from harness.errors import DataError

MVTEC_AD = "mvtec_ad"
MVTEC_LOCO = "mvtec_loco"
LOCO_KINDS = {"logical_anomalies": "logical", "structural_anomalies": "structural"}
EXPECTED_LAYOUTS = (
    "expected MVTec AD (train/good, test/<defect>/NNN.png, ground_truth/<defect>/NNN_mask.png) or "
    "MVTec LOCO (train/good, validation/good, test/{good,logical_anomalies,structural_anomalies}, "
    "ground_truth/<anomaly>/NNN/000.png)"
)


@dataclass
class Findings:
    """Collects problems; in strict mode the first error is raised instead."""

    strict: bool
    errors: list[DataError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, path: Path, problem: str) -> None:
        err = DataError(path, problem)
        if self.strict:
            raise err
        self.errors.append(err)

    def warn(self, path: Path, problem: str) -> None:
        self.warnings.append(f"{path}: {problem}")


def list_categories(root: Path) -> list[str]:
    """Names of the category folders under a data set root."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "data set root not found (expected a folder holding category folders)")
    if (root / "test").is_dir() or (root / "train").is_dir():
        raise DataError(root, f"this looks like a category folder; pass its parent ({root.parent}) as the root")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and ((p / "test").is_dir() or (p / "train").is_dir()))
    if not names:
        raise DataError(root, f"no category folders found; {EXPECTED_LAYOUTS}")
    return names


def detect_layout(category_dir: Path) -> str:
    test = category_dir / "test"
    if not category_dir.is_dir():
        raise DataError(category_dir, "category folder not found")
    if not test.is_dir():
        raise DataError(category_dir, f"unknown layout: no test folder; {EXPECTED_LAYOUTS}")
    if (category_dir / "validation").is_dir() or any((test / name).is_dir() for name in LOCO_KINDS):
        return MVTEC_LOCO
    return MVTEC_AD


def read_category(
    root: Path,
    name: str,
    *,
    captions: Path | CaptionSource | None = None,
    require_captions: bool = False,
    require_train: bool = True,
    verify: bool = False,
    strict: bool = True,
    dataset: str | None = None,
    findings: Findings | None = None,
) -> Category:
    """Read one category folder of a data set root into a Category."""
    root = Path(root)
    category_dir = root / name
    findings = findings or Findings(strict=strict)
    layout = detect_layout(category_dir)
    source = captions if isinstance(captions, CaptionSource) else caption_source(category_dir, captions)
    reader = _Reader(category_dir, name, layout, source, require_captions, verify, findings)
    train_good = reader.normals("train", required=require_train)
    validation_good = reader.normals("validation", required=False) if layout == MVTEC_LOCO else []
    test_good = reader.normals("test", required=False)
    defects = reader.defects()
    reader.check_colour_modes()
    return Category(
        dataset=dataset or root.name,
        name=name,
        root=category_dir,
        layout=layout,
        train_good=train_good,
        validation_good=validation_good,
        test_good=test_good,
        defects=defects,
        warnings=list(findings.warnings),
        saturation=read_defects_config(category_dir / DEFECTS_CONFIG) if layout == MVTEC_LOCO else None,
    )


def read_defects_config(path: Path) -> dict[int, SaturationRule] | None:
    """MVTec LOCO's defects_config.json (a list of {defect_name, pixel_value, saturation_threshold,
    relative_saturation}) by pixel value; None when the category has none (sPRO is then not computed)."""
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(path, f"unreadable ({err})") from None
    if not isinstance(entries, list):
        raise DataError(path, "must be a list of defect entries")
    rules = {}
    for i, entry in enumerate(entries):
        missing = {"defect_name", "pixel_value", "saturation_threshold", "relative_saturation"} - set(entry)
        if missing:
            raise DataError(path, f"entry {i}: missing {', '.join(sorted(missing))}")
        value, threshold, relative = entry["pixel_value"], entry["saturation_threshold"], entry["relative_saturation"]
        if not isinstance(value, int) or not 0 < value < 256 or value in rules:
            raise DataError(path, f"entry {i}: pixel_value must be a new integer in 1..255, not {value!r}")
        if not isinstance(relative, bool) or not isinstance(threshold, (int, float)) or threshold <= 0 or (
                relative and threshold > 1):
            raise DataError(path, f"entry {i}: saturation_threshold {threshold!r} with relative_saturation "
                                  f"{relative!r} (relative: a fraction in (0, 1]; else a pixel count)")
        rules[value] = SaturationRule(str(entry["defect_name"]), float(threshold), relative)
    return rules


def read_dataset(root: Path, categories: list[str] | None = None, **kwargs) -> list[Category]:
    """Read several categories; `captions` may be a JSON path shared by all of them."""
    root = Path(root)
    names = categories or list_categories(root)
    captions = kwargs.pop("captions", None)
    if isinstance(captions, (str, Path)):
        captions = JsonCaptions(Path(captions))
    known = set(list_categories(root)) if categories else set(names)
    for name in names:
        if name not in known:
            raise DataError(root / name, f"no such category; found: {', '.join(sorted(known))}")
    return [read_category(root, name, captions=captions, **kwargs) for name in names]


class _Reader:
    def __init__(self, category_dir: Path, name: str, layout: str, captions: CaptionSource | None,
                 require_captions: bool, verify: bool, findings: Findings):
        self.dir = category_dir
        self.name = name
        self.layout = layout
        self.captions = captions
        self.require_captions = require_captions
        self.verify = verify
        self.findings = findings
        self.grayscale: list[Path] = []
        self.colour: list[Path] = []

    def images_in(self, folder: Path) -> list[Path]:
        files = [p for p in folder.iterdir() if is_image_file(p)]
        return sorted(files, key=lambda p: file_id_sort_key(p.stem))

    def normals(self, part: str, required: bool) -> list[Sample]:
        folder = self.dir / part / GOOD
        if not folder.is_dir():
            if required:
                self.findings.error(folder, f"missing {part}/good folder (normal {part} images)")
            return []
        files = self.images_in(folder)
        if not files and required:
            self.findings.error(folder, f"no images in {part}/good: the normal {part} images are needed")
        samples = []
        for path in files:
            if self._readable(path):
                samples.append(Sample(self.name, part, GOOD, path.stem, path))
        return samples

    def defects(self) -> dict[str, list[Sample]]:
        defects: dict[str, list[Sample]] = {}
        for folder in sorted(p for p in (self.dir / "test").iterdir() if p.is_dir() and p.name != GOOD):
            files = self.images_in(folder)
            if not files:
                self.findings.error(folder, f"defect folder '{folder.name}' has no images")
                continue
            gt_dir = self.dir / "ground_truth" / folder.name
            if not gt_dir.is_dir():
                self.findings.error(gt_dir, f"missing ground-truth folder for defect type '{folder.name}'")
                continue
            samples = [s for s in (self.defect_sample(folder.name, path, gt_dir) for path in files) if s]
            if samples:
                defects[folder.name] = samples
        if not defects and not self.findings.errors:
            self.findings.warn(self.dir / "test", "no defect types found")
        return defects

    def defect_sample(self, defect: str, path: Path, gt_dir: Path) -> Sample | None:
        if not self._readable(path):
            return None
        masks = self.mvtec_masks(path, gt_dir) if self.layout == MVTEC_AD else self.loco_masks(path, gt_dir)
        if masks is None:
            return None
        caption = self.caption(defect, path)
        if caption is None and self.require_captions:
            return None
        return Sample(self.name, "test", defect, path.stem, path, tuple(masks), caption, LOCO_KINDS.get(defect))

    def mvtec_masks(self, path: Path, gt_dir: Path) -> list[Path] | None:
        candidates = [gt_dir / f"{path.stem}_mask{ext}" for ext in (".png", path.suffix)]
        candidates += [gt_dir / f"{path.stem}{ext}" for ext in (".png", path.suffix)]
        mask = next((c for c in candidates if c.is_file()), None)
        if mask is None:
            self.findings.error(candidates[0], f"missing mask for {path.relative_to(self.dir)}")
            return None
        return [mask] if self._mask_ok(mask, path) else None

    def loco_masks(self, path: Path, gt_dir: Path) -> list[Path] | None:
        region_dir = gt_dir / path.stem
        masks = self.images_in(region_dir) if region_dir.is_dir() else []
        if not masks:
            self.findings.error(region_dir, f"missing masks for {path.relative_to(self.dir)} (expected NNN/000.png ...)")
            return None
        return masks if all(self._mask_ok(mask, path) for mask in masks) else None

    def caption(self, defect: str, path: Path) -> str | None:
        text = self.captions.lookup(self.dir, self.name, defect, path.stem) if self.captions else None
        if text is None and self.require_captions:
            where = self.captions.where(self.dir, self.name, defect, path.stem) if self.captions else (
                f"{self.dir / 'prompt' / defect / (path.stem + '.txt')} (no prompt folder and no caption JSON given)")
            self.findings.error(path, f"defect image has no caption (looked for {where})")
        return text

    def check_colour_modes(self) -> None:
        """One warning when a category mixes grayscale and colour images: every image is read as RGB (grayscale as
        three equal channels), so a defect cut from a grayscale image and pasted onto a colour one, or the other
        way round, looks unlike any real defect, and the leaderboard says so."""
        if self.grayscale and self.colour:
            example = self.grayscale[0].relative_to(self.dir)
            self.findings.warn(self.dir, f"mixes {len(self.grayscale)} grayscale images (e.g. {example}) with "
                                         f"{len(self.colour)} colour images; all are read as RGB")

    def _readable(self, path: Path) -> bool:
        try:
            _, mode = image_header(path)
            (self.grayscale if mode in GRAYSCALE_MODES else self.colour).append(path)
            if self.verify:
                verify_image(path)
            return True
        except DataError as err:
            self.findings.error(err.path, err.problem)
            return False

    def _mask_ok(self, mask: Path, image: Path) -> bool:
        try:
            mask_size, image_wh = image_size(mask), image_size(image)
        except DataError as err:
            self.findings.error(err.path, err.problem)
            return False
        if mask_size != image_wh:
            self.findings.error(mask, f"mask is {mask_size[0]}x{mask_size[1]} but its image "
                                      f"{image.relative_to(self.dir)} is {image_wh[0]}x{image_wh[1]}")
            return False
        if self.verify:
            try:
                if not read_mask(mask).any():
                    self.findings.warn(mask, "mask is empty (no defect pixels)")
            except DataError as err:
                self.findings.error(err.path, err.problem)
                return False
        return True
