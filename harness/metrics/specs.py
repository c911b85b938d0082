"""What each metric is, in one place: its label, which way is better, how it prints, where it is shown, and how
many images it needs. Tables, leaderboards, the console summary, figures, `defectbench score` and suite checks all
read this table (it imports nothing heavy: listing metrics does not load torch).

    SPECS["fid"].label, SPECS["fid"].format(12.3456), SPECS["fid"].arrow()
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from harness.registry import Registry

GENERATION, DETECTION, CLASSIFICATION = "generation", "detection", "classification"
PUBLISHED_MARK = "ᵖ"  # a `_compat` metric: the published evaluation code's rules


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as records hold it
    label: str  # as tables print it
    direction: str | None  # "up", "down", or None where the papers disagree on how to read it (never ranked)
    family: str  # generation (score jobs), detection (maps of segment and detect jobs), classification
    group: str  # the leaderboard table it is shown in
    decimals: int = 3
    percent: bool = False  # a fraction, printed as a percentage as the papers print it
    small: float | None = None  # below this magnitude printed as 1.2e-04 (KID)
    headline: bool = False  # in the console summary and the leaderboard's headline figures
    minimum: tuple[str, int] | None = None  # (what is counted, least number): below it the value is flagged

    def format(self, value: float) -> str:
        if self.percent:
            return f"{100 * value:.{self.decimals}f}"
        if self.small is not None and value != 0 and abs(value) < self.small:
            return f"{value:.1e}"
        return f"{value:.{self.decimals}f}"

    def arrow(self, latex: bool = False) -> str:
        if self.direction is None:
            return ""
        if latex:
            return r"$\uparrow$" if self.direction == "up" else r"$\downarrow$"
        return "↑" if self.direction == "up" else "↓"


SPECS: Registry[MetricSpec] = Registry("metric", MetricSpec)

_G = dict(family=GENERATION)
_D = dict(family=DETECTION, group="detection", direction="up", percent=True, decimals=1)
for _spec in (
    # FID and KID estimate 2048-d statistics of the real defects from the test images of one defect type; IS over
    # its standard 10 splits wants at least 10 images per split
    MetricSpec("is", "IS", "up", group="quality", headline=True, minimum=("generated images", 100), **_G),
    MetricSpec("fid", "FID", "down", group="fidelity", decimals=2, headline=True, minimum=("real images", 10), **_G),
    MetricSpec("kid", "KID", "down", group="fidelity", decimals=4, small=1e-3, headline=True,
               minimum=("real images", 10), **_G),
    MetricSpec("ic_lpips", "IC-LPIPS", "up", group="quality", headline=True, **_G),
    MetricSpec("lpips_to_real", "LPIPS-real", None, group="fidelity", **_G),
    MetricSpec("bg_psnr", "BG-PSNR", "up", group="background", decimals=2, headline=True, **_G),
    MetricSpec("bg_lpips", "BG-LPIPS", "down", group="background", **_G),
    MetricSpec("mask_iou", "Mask-IoU", "up", group="background", headline=True, **_G),
    MetricSpec("image_auroc", "I-AUROC", headline=True, **_D),
    MetricSpec("image_ap", "I-AP", headline=True, **_D),
    MetricSpec("image_f1max", "I-F1max", **_D),
    MetricSpec("pixel_auroc", "P-AUROC", headline=True, **_D),
    MetricSpec("pixel_ap", "P-AP", headline=True, **_D),
    MetricSpec("pixel_f1max", "P-F1max", **_D),
    MetricSpec("pixel_aupro", "AUPRO", headline=True, **_D),
    # MVTec LOCO's own (harness.metrics.spro): recorded for LOCO-layout categories only
    MetricSpec("pixel_spro", "AU-sPRO", **_D),
    MetricSpec("accuracy", "Acc", headline=True, **{**_D, "family": CLASSIFICATION, "group": "classification"}),
    MetricSpec("class_accuracy", "Acc (class)", **{**_D, "family": CLASSIFICATION, "group": "classification"}),
):
    SPECS.add(_spec.name, _spec)

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
# the same measured under the published evaluation code's rules (harness.metrics.detection, `_compat`)
for _name in (*IMAGE_METRICS, *PIXEL_METRICS):
    _spec = SPECS[_name]
    SPECS.add(f"{_name}_compat", replace(_spec, name=f"{_name}_compat", label=_spec.label + PUBLISHED_MARK,
                                           headline=False))
COMPAT_METRICS = tuple(f"{m}_compat" for m in (*IMAGE_METRICS, *PIXEL_METRICS))
LOCO_METRICS = ("pixel_spro",)  # recorded for LOCO-layout categories only


def spec(name: str) -> MetricSpec | None:
    """The metric's spec, or None for a name no spec describes (a method's own record)."""
    return SPECS.get(name)


def names(family: str | None = None, group: str | None = None, headline: bool | None = None) -> tuple[str, ...]:
    """The metrics of a family and / or group, in the table's order."""
    return tuple(n for n, s in SPECS.items() if (family is None or s.family == family)
                 and (group is None or s.group == group) and (headline is None or s.headline == headline))


def label(name: str) -> str:
    found = spec(name)
    return found.label if found else name


def arrow(name: str, latex: bool = False) -> str:
    found = spec(name)
    return found.arrow(latex) if found else ""


def direction(name: str) -> str | None:
    found = spec(name)
    return found.direction if found else None


def format_value(value: float, name: str) -> str:
    found = spec(name)
    return found.format(value) if found else f"{value:.3f}"
