"""Settings of downstream models and detectors (harness/downstream/models.yaml), per profile."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from harness.device import AUTOCAST_TYPES
from harness.errors import ConfigError
from harness.methods import check_types, merge_config
from harness.profiles import Profile, get_profile
from harness.registry import Registry, unknown_name

MODELS_FILE = Path(__file__).with_name("models.yaml")


@dataclass(frozen=True)
class DownstreamModel:
    name: str  # in models.yaml and suites' `downstream:`
    kind: str  # the job kind that trains and scores it (harness/runner/kinds/downstream.py)
    trunk: str | None  # its pretrained network (harness/weights.py), if any; a detector's is its config's `backbone`


DOWNSTREAM_MODELS: Registry[DownstreamModel] = Registry("downstream model", DownstreamModel)
for _model in (DownstreamModel("segmentation", "segment", None),
               DownstreamModel("classification", "classify", "resnet34")):
    DOWNSTREAM_MODELS.add(_model.name, _model)
# Model selection of the segmentation U-Net: held-out generated + normal images, the test part (the published
# practice, marked in every table), or the last epoch.
SELECTIONS = ("validation", "test", "last")
# shares of something: within [0, 1] (validation_fraction below 1: holding out every generated image leaves none to
# train on). Every other number of models.yaml is a count (epochs, batch size, width: at least 1) or a rate (>= 0).
SHARES = ("p_generated", "coreset_sampling_ratio", "validation_fraction")


@lru_cache(maxsize=1)
def _table() -> dict:
    return yaml.safe_load(MODELS_FILE.read_text(encoding="utf-8"))


def detector_names() -> tuple[str, ...]:
    return tuple(_table()["detectors"])


def model_config(name: str, profile: str | Profile, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings of a downstream model ('segmentation', 'classification') or a detector ('patchcore', ...)."""
    table = _table()
    entry = table.get(name) if name in DOWNSTREAM_MODELS else table["detectors"].get(name)
    if entry is None:
        raise ConfigError(unknown_name("downstream model or detector", name, [*DOWNSTREAM_MODELS, *table["detectors"]]))
    profile = get_profile(profile)
    config = merge_config(copy.deepcopy(entry["all"]), entry.get(profile.name) or {}, f"{MODELS_FILE} ({name})")
    check_types(overrides or {}, config, entry["all"], f"settings of {name!r}")
    _check_ranges(overrides or {}, config, f"settings of {name!r}")
    return merge_config(config, overrides or {}, f"settings of {name!r}")


def _check_ranges(given: dict, expected: dict, where: str) -> None:
    """Counts at least 1, rates at least 0, shares within [0, 1]: `epochs: -1` fails when the suite is read."""
    for key, value in given.items():
        default = expected.get(key)
        if isinstance(default, bool) or isinstance(value, bool) or not isinstance(default, (int, float)):
            continue  # not a number (a value of the wrong type: check_types has named it)
        if isinstance(default, int) and value < 1:
            raise ConfigError(f"{where}: {key!r} must be a positive integer, not {value!r}")
        if value < 0 or key in SHARES and value > 1 or key == "validation_fraction" and value == 1:
            rule = ("lie in [0, 1)" if key == "validation_fraction" else "lie in [0, 1]" if key in SHARES
                    else "be at least 0")
            raise ConfigError(f"{where}: {key!r} must {rule}, not {value!r}")


def parse_models(value, where: str, key: str, profile: str) -> tuple[dict, ...]:
    """A suite's `downstream:` or `detectors:` list: names or {name: ..., config: {...}}; 'all' for detectors."""
    allowed = tuple(DOWNSTREAM_MODELS) if key == "downstream" else detector_names()
    if value in (None, []):
        return ()
    if value == "all":
        value = list(allowed)
    if not isinstance(value, list):
        raise ConfigError(f"{where}: '{key}' must be a list (or 'all' for detectors), not {type(value).__name__}")
    out, seen = [], set()
    for i, item in enumerate(value):
        item = {"name": item} if isinstance(item, str) else item
        if (not isinstance(item, dict) or set(item) - {"name", "config"}
                or not isinstance(item.get("config") or {}, dict)):
            raise ConfigError(f"{where}: {key}[{i}] must be a name or a mapping with 'name' and 'config' (a mapping)")
        name = item.get("name")
        if name not in allowed:
            raise ConfigError(f"{where}: {key}[{i}]: unknown {key[:-1] if key == 'detectors' else 'downstream model'} "
                              f"{name!r}; known: {', '.join(allowed)}")
        if name in seen:
            raise ConfigError(f"{where}: {key}[{i}]: {name!r} is listed twice")
        seen.add(name)
        try:
            config = model_config(name, profile, item.get("config") or {})
        except ConfigError as err:
            raise ConfigError(f"{where}: {key}[{i}].config: {err}") from None
        if config.get("select_on", "validation") not in SELECTIONS:
            raise ConfigError(f"{where}: {key}[{i}].config.select_on: {config['select_on']!r}; choose from "
                              f"{', '.join(SELECTIONS)}")
        if config.get("autocast", "float32") not in AUTOCAST_TYPES:
            raise ConfigError(f"{where}: {key}[{i}].config.autocast: {config['autocast']!r}; choose from "
                              f"{', '.join(AUTOCAST_TYPES)}")
        out.append({"name": name, "config": dict(item.get("config") or {})})
    return tuple(out)
