"""`defectbench inspect`: what a data set root holds, and every problem found in it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.data.captions import JsonCaptions
from harness.data.layouts import Findings, list_categories, read_category
from harness.data.model import Category
from harness.errors import DataError


@dataclass
class Inspection:
    root: Path
    categories: list[Category] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        rows = []
        for category in self.categories:
            base = {"category": category.name, "layout": category.layout}
            rows.append({**base, "part": "train/good", "images": len(category.train_good), "masks": "", "captions": ""})
            if category.validation_good:
                rows.append({**base, "part": "validation/good", "images": len(category.validation_good), "masks": "",
                             "captions": ""})
            rows.append({**base, "part": "test/good", "images": len(category.test_good), "masks": "", "captions": ""})
            for defect in category.defect_types:
                samples = category.defects[defect]
                rows.append({**base, "part": f"test/{defect}", "images": len(samples),
                             "masks": sum(len(s.masks) for s in samples),
                             "captions": sum(s.caption is not None for s in samples)})
        return rows


def inspect_dataset(root: Path, captions: Path | None = None, categories: list[str] | None = None,
                    verify: bool = True) -> Inspection:
    """Read every category without stopping at the first problem; decode every file when `verify`."""
    root = Path(root)
    result = Inspection(root)
    names = categories or list_categories(root)
    source = JsonCaptions(captions) if captions else None
    for name in names:
        findings = Findings(strict=False)
        try:
            category = read_category(root, name, captions=source, require_train=True, verify=verify,
                                     strict=False, findings=findings)
            result.categories.append(category)
        except DataError as err:
            findings.errors.append(err)
        result.errors += [str(e) for e in findings.errors]
        result.warnings += findings.warnings
    return result
