"""The numbers the papers report (results/reported/*.yaml), read as printed, and their printed averages checked.

Each file transcribes one table exactly as printed (results/reported/README.md). The reader keeps how many
decimals each number was printed with, so that a printed Average can be compared with the mean of the printed
rows up to rounding: the papers' averages often disagree with their own rows (DualAnoDiff Table 3 prints 72.26
where its 14 rows average to 77.43), and a leaderboard shows both, flagged.

Conventions of the files (beyond the README's): a per-category value of MVTec LOCO's logical or structural
anomalies carries the suffix `_logical` / `_structural`; `aupro` is DefectBench's `pixel_aupro`; `average` is the
printed Average over the data set's categories (for LOCO's plain metric names, over every logical and structural
cell); `average_<a>_<b>...` is a printed average over the listed categories only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from harness.errors import ConfigError

CATEGORIES = {
    "mvtec_ad": ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
                 "tile", "toothbrush", "transistor", "wood", "zipper"),
    "mvtec_loco": ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors"),
}
ONE_DEFECT_TYPE = "toothbrush"  # MVTec AD's category with a single defect type: no classification
SCOPES = {"_logical": "logical_anomalies", "_structural": "structural_anomalies"}
RENAMED = {"aupro": "pixel_aupro"}
AVERAGE = "average"


class Printed(float):
    """A number as printed: its value and how many decimals it was printed with."""

    decimals: int

    def __new__(cls, text: str) -> "Printed":
        number = super().__new__(cls, float(text))
        number.decimals = len(text.split(".")[1]) if "." in text else 0
        return number


class _PrintedLoader(yaml.SafeLoader):
    pass


for _tag in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int"):
    _PrintedLoader.add_constructor(_tag, lambda loader, node: Printed(loader.construct_scalar(node)))


@dataclass
class Reported:
    path: Path
    source: str  # paper and table
    dataset: str  # mvtec_ad | mvtec_loco
    protocol: str
    rows: pd.DataFrame  # category, method, metric, scope, value (DefectBench's units), printed, decimals, scale


def split_metric(name: str) -> tuple[str, str]:
    """('pixel_aupro', 'logical_anomalies') from 'aupro_logical'; scope 'all' without a suffix."""
    for suffix, scope in SCOPES.items():
        if name.endswith(suffix):
            return RENAMED.get(name[: -len(suffix)], name[: -len(suffix)]), scope
    return RENAMED.get(name, name), "all"


def load_reported(folder: Path) -> list[Reported]:
    out = []
    for path in sorted(Path(folder).glob("*.yaml")):
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_PrintedLoader) or {}
            scale = {k: float(v) for k, v in (data.get("scale") or {}).items()}
            rows = []
            for method, categories in data["values"].items():
                for category, metrics in categories.items():
                    for name, value in metrics.items():
                        if value is None:
                            continue
                        metric, scope = split_metric(name)
                        factor = scale.get(name, 1.0)
                        rows.append({"category": category, "method": method, "metric": metric, "scope": scope,
                                     "value": float(value) / factor, "printed": float(value),
                                     "decimals": getattr(value, "decimals", 0), "scale": factor})
            source = f"{data['source']['paper']}, {data['source']['table']}"
            out.append(Reported(path, source, data["dataset"], str(data.get("protocol", "?")), pd.DataFrame(rows)))
        except (KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: malformed reported numbers ({err}); expected source, dataset, values") from None
    return out


def table_rows(entries: list[Reported], layout: str, categories: list[str], metrics: list[str], scope: str = "all",
               suffix: str = "") -> tuple[pd.DataFrame | None, list[str]]:
    """Reported rows for a leaderboard table of `layout` data (categories, metrics, scope): the per-category values
    of those categories, and a printed average (as category 'average', with its rounding tolerance in DefectBench's
    units) where it averages exactly what the table's Average row does. `suffix` maps a reported metric onto the
    table's column (`_compat`: the published evaluation)."""
    frames, sources = [], []
    names = [m[: len(m) - len(suffix)] if suffix else m for m in metrics]
    for entry in entries:
        rows = entry.rows
        if entry.dataset != layout or rows.empty:
            continue
        rows = rows[rows["metric"].isin(names) & (rows["scope"] == scope)]
        keep = pd.concat([rows[rows["category"].isin(categories)], _comparable_averages(rows, categories, layout)])
        if keep.empty:
            continue
        keep = keep.assign(metric=keep["metric"] + suffix, tolerance=10.0 ** -keep["decimals"] / keep["scale"])
        frames.append(keep[["category", "method", "metric", "value", "tolerance"]])
        sources.append(f"{entry.source} (protocol `{entry.protocol}`)")
    return (pd.concat(frames) if frames else None), sources


def _comparable_averages(rows: pd.DataFrame, categories: list[str], layout: str) -> pd.DataFrame:
    """The printed averages that stand for the same categories as a table of `categories`, as category 'average':
    one whose rows are all among them, a printed-only one when the table covers the whole data set, an
    `average_<list>` when the table has exactly those categories."""
    whole = set(CATEGORIES.get(layout, ())) <= set(categories) | {ONE_DEFECT_TYPE}
    out = []
    for (method, metric), group in rows.groupby(["method", "metric"]):
        printed = set(group["category"]) - {AVERAGE}
        for key in {c for c in printed if c.startswith(AVERAGE + "_")}:
            if sorted(listed_categories(key, layout)) == sorted(categories):
                out.append(group[group["category"] == key].assign(category=AVERAGE))
        rows_printed = {c for c in printed if not c.startswith(AVERAGE)}
        if (rows_printed and rows_printed <= set(categories) and whole) or (not rows_printed and whole):
            out.append(group[group["category"] == AVERAGE])
    return pd.concat(out) if out else rows.iloc[0:0]


@dataclass
class AverageCheck:
    source: str
    file: str  # results/reported/<file>.yaml
    method: str
    key: str  # average | average_<categories>
    metric: str  # as printed in the file
    printed: float
    mean: float | None  # of the printed rows it averages; None when they are not all printed
    n_rows: int
    decimals: int

    @property
    def checkable(self) -> bool:
        return self.mean is not None

    @property
    def differs(self) -> bool:
        """The mean of the rows does not round to the printed average (a tie, such as 32.425 printed as 32.43,
        rounds either way)."""
        return self.checkable and abs(self.mean - self.printed) > 0.5 * 10.0 ** -self.decimals * (1 + 1e-9)

    @property
    def beyond_rounding(self) -> bool:
        """More than one unit of the last printed digit apart: rounded rows and a rounded average cannot explain it."""
        return self.checkable and abs(self.mean - self.printed) > 10.0 ** -self.decimals * (1 + 1e-9)


def check_averages(entries: list[Reported]) -> list[AverageCheck]:
    """Every printed average against the mean of the printed rows it averages (where they are all printed)."""
    checks = []
    for entry in entries:
        data = yaml.load(entry.path.read_text(encoding="utf-8"), Loader=_PrintedLoader)
        for method, categories in data["values"].items():
            for key, metrics in categories.items():
                if not key.startswith(AVERAGE):
                    continue
                for name, printed in metrics.items():
                    if printed is None:
                        continue
                    cells = _averaged_cells(categories, key, name, entry.dataset)
                    mean = sum(cells) / len(cells) if cells else None
                    checks.append(AverageCheck(entry.source, entry.path.stem, method, key, name, float(printed), mean,
                                               len(cells), getattr(printed, "decimals", 0)))
    return checks


def _averaged_cells(categories: dict, key: str, name: str, dataset: str) -> list[float]:
    """The printed cells an average stands for, or [] when not all of them are printed."""
    expected = listed_categories(key, dataset)
    plain = any(categories.get(c, {}).get(name) is not None for c in expected)
    names = [name] if plain else [name + s for s in SCOPES]  # LOCO: a plain average over logical and structural
    cells = [(category, categories[category][n]) for category in expected for n in names
             if category in categories and categories[category].get(n) is not None]
    missing = set(expected) - {category for category, _ in cells}
    # an average over MVTec AD may leave out toothbrush, which has one defect type (DualAnoDiff's classification
    # tables); any other missing row means the average stands for rows that are not printed
    if missing - ({ONE_DEFECT_TYPE} if key == AVERAGE else set()) or len(cells) < 2:
        return []
    return [float(v) for _, v in cells]


def listed_categories(key: str, dataset: str) -> list[str]:
    """The categories an average row stands for: the data set's for `average`, the listed ones for
    `average_<a>_<b>...` (category names hold '_' themselves, so they are matched whole)."""
    known = CATEGORIES.get(dataset, ())
    if key == AVERAGE:
        return list(known)
    listed = f"_{key[len(AVERAGE) + 1:]}_"
    return [c for c in known if f"_{c}_" in listed]
