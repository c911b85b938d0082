"""Suite files (suites/*.yaml): what to run, validated before anything runs.

Every unknown or mistyped key, unknown method, unknown metric or missing data root is one ConfigError naming
the key (or path) and the suite file. `${DATA}` in a root is replaced by --data or the DATA environment variable.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.data.splits import PROTOCOLS
from harness.downstream.config import parse_models
from harness.errors import ConfigError
from harness.metrics.iclpips_presets import PRESETS
from harness.metrics.specs import GENERATION, names
from harness.paths import REPO_ROOT
from harness.profiles import PROFILES, TINY, Profile
from harness.runner.kinds import KINDS

SUITES_DIR = REPO_ROOT / "suites"
LAYOUTS = ("synthetic", "mvtec_ad", "mvtec_loco", "auto")
EXECUTORS = ("ray", "serial")
SYNTH_KEYS = {"seed", "size", "n_train", "n_validation", "n_test_good", "n_defect"}
TOP_KEYS = {"name", "description", "datasets", "protocol", "profile", "methods", "generate", "metrics", "ic_lpips",
            "downstream", "detectors", "seeds", "executor", "weights", "backbone"}
DATASET_KEYS = {"name", "layout", "root", "captions", "categories", "synth", "pretrain_categories"}
METHOD_KEYS = {"method", "label", "config"}
GENERATE_KEYS = {"n"}
EXECUTOR_KEYS = {"kind", "num_cpus", "address", "max_retries", "timeouts"}
MAX_SUITE_BYTES = 2**20  # a suite is a page of settings; a larger file is a mistake (or an attack on the parser)
MAX_PER_DEFECT = 10_000  # 10x the papers' 1000: a generate job holds its n masks in memory, and no data set bounds n


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    layout: str
    root: Path | None = None  # None for the synthetic set: generated on demand into the cache
    captions: Path | None = None
    categories: tuple[str, ...] | None = None  # None: every category found
    synth: dict = field(default_factory=dict)
    # whose normal training images the shipped tiny backbone is fine-tuned on where it has not seen them; None: the
    # categories above (a run on one category can fine-tune on several)
    pretrain_categories: tuple[str, ...] | None = None


@dataclass(frozen=True)
class MethodSpec:
    label: str  # the name shown in leaderboards (a method with settings can appear several times)
    method: str  # the directory under methods/
    config: dict = field(default_factory=dict)
    from_all: bool = False  # chosen by `methods: all`, not named: left out of a data set it cannot run on


@dataclass(frozen=True)
class ExecutorSpec:
    kind: str = "ray"
    num_cpus: int | None = None  # None: all CPUs of this machine
    address: str | None = None  # an existing Ray cluster; None starts one here
    max_retries: int = 2  # a job whose worker died is retried this often
    timeouts: dict = field(default_factory=dict)  # job kind -> seconds; the rest: the kind's own (JobKind.timeout)

    def timeout(self, kind: str) -> float:
        """How long a job of this kind may run before it is stopped and recorded as failed."""
        return float(self.timeouts[kind]) if kind in self.timeouts else float(KINDS[kind].timeout)


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path | None
    datasets: tuple[DatasetSpec, ...]
    methods: tuple[MethodSpec, ...]
    protocol: str = "clean-thirds"
    profile: Profile = TINY  # parsed once: its properties, never its name, decide what the plan does
    n_per_defect: int = 12
    metrics: tuple[str, ...] = names(GENERATION)
    ic_lpips: str = "ic_lpips"
    seeds: tuple[int, ...] = (0,)
    downstream: tuple[dict, ...] = ()  # {name: segmentation | classification, config: {...}}
    detectors: tuple[dict, ...] = ()  # {name: patchcore | ..., config: {...}}
    executor: ExecutorSpec = ExecutorSpec()
    weights: dict = field(default_factory=dict)
    backbone: dict = field(default_factory=dict)  # the shipped tiny backbone's fine-tuning (provision.FINETUNE)
    description: str = ""

    def where(self) -> str:
        return str(self.path) if self.path else f"suite {self.name!r}"


def suite_path(name_or_path: str | Path) -> Path:
    """A suite file given as a path, or as a name under suites/ (`smoke` -> suites/smoke.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{path}: suite file not found")
        return path
    candidate = SUITES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown suite {str(name_or_path)!r}: no {candidate}; known: {', '.join(known)}")
    return candidate


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without aliases: no suite needs them, and a few nested ones (an alias bomb) expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: alias *{event.anchor}: suites take no YAML aliases")
        return super().compose_node(parent, index)


def load_suite(name_or_path: str | Path, data: str | Path | None = None, check_methods: bool = True) -> Suite:
    path = suite_path(name_or_path)
    with path.open("rb") as file:
        text = file.read(MAX_SUITE_BYTES + 1)
    if len(text) > MAX_SUITE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_SUITE_BYTES // 2**20} MiB, the most a suite file may hold")
    try:
        raw = yaml.load(text.decode("utf-8"), Loader=_NoAliasLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: invalid YAML ({err})") from None
    except ConfigError as err:  # an alias
        raise ConfigError(f"{path}: {err}") from None
    return parse_suite(raw, path, data, check_methods)


def parse_suite(raw: dict, path: Path | None, data: str | Path | None = None, check_methods: bool = True) -> Suite:
    where = str(path) if path else "suite"
    if not raw:  # else every default at once: the synthetic data set, every method, every metric (403 jobs)
        raise ConfigError(f"{where}: the suite is empty; give at least its data sets and methods (suites/smoke.yaml)")
    _mapping(raw, where, "the top level")
    _keys(raw, TOP_KEYS, where, "")
    name = path_component(raw.get("name") or (path.stem if path else "suite"), where, "name")
    protocol = _choice(raw.get("protocol", "clean-thirds"), PROTOCOLS, where, "protocol")
    profile = PROFILES[_choice(raw.get("profile", "tiny"), tuple(PROFILES), where, "profile")]
    generate = raw.get("generate") or {}
    _mapping(generate, where, "generate")
    _keys(generate, GENERATE_KEYS, where, "generate.")
    n = _positive_int(generate.get("n", 12), where, "generate.n")
    if n > MAX_PER_DEFECT:
        raise ConfigError(f"{where}: generate.n is {n}; at most {MAX_PER_DEFECT} images per defect type (the papers "
                          "generate 1000)")
    known = names(GENERATION)  # what a score job computes (harness/metrics/specs.py)
    metrics = tuple(_list(raw.get("metrics", list(known)), where, "metrics"))
    for metric in metrics:
        _choice(metric, known, where, "metrics")
    if not metrics:
        raise ConfigError(f"{where}: 'metrics' is empty; name at least one of {', '.join(known)}")
    seeds = _seeds(raw.get("seeds", [0]), where)
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{where}: description must be text, not {type(description).__name__}")
    return Suite(
        name=name, path=path, description=description,
        datasets=tuple(_datasets(raw.get("datasets"), where, data)),
        methods=tuple(_methods(raw.get("methods"), where, check_methods, profile)),
        protocol=protocol, profile=profile, n_per_defect=n, metrics=metrics,
        ic_lpips=_choice(raw.get("ic_lpips", "ic_lpips"), tuple(PRESETS), where, "ic_lpips"),
        seeds=seeds, downstream=parse_models(raw.get("downstream"), where, "downstream", profile),
        detectors=parse_models(raw.get("detectors"), where, "detectors", profile),
        executor=_executor(raw.get("executor") or {}, where), weights=_weights(raw.get("weights") or {}, where),
        backbone=_backbone(raw.get("backbone") or {}, where, profile),
    )


def _backbone(value: Any, where: str, profile: Profile) -> dict:
    """The fine-tuning settings of the shipped tiny backbone on unseen categories (provision.FINETUNE)."""
    from harness.diffusion.provision import finetune_config

    _mapping(value, where, "backbone")
    finetune_config(value, profile.resolution, f"{where}: backbone")  # unknown keys, bad values fail here
    return dict(value)


def _datasets(value: Any, where: str, data: str | Path | None) -> list[DatasetSpec]:
    items = _list(value if value is not None else [{"name": "synthetic", "layout": "synthetic"}], where, "datasets")
    if not items:
        raise ConfigError(f"{where}: 'datasets' is empty")
    out = []
    for i, item in enumerate(items):
        key = f"datasets[{i}]"
        _mapping(item, where, key)
        _keys(item, DATASET_KEYS, where, key + ".")
        layout = _choice(item.get("layout", "auto"), LAYOUTS, where, key + ".layout")
        synth = _synth(item.get("synth") or {}, where, key + ".synth")
        root = None
        if layout != "synthetic":
            root = _root(item.get("root"), where, key + ".root", data)
        captions = _root(item["captions"], where, key + ".captions", data) if item.get("captions") else None
        categories = _category_names(item.get("categories", "all"), where, key + ".categories")
        pretrain = _category_names(item.get("pretrain_categories"), where, key + ".pretrain_categories", every=False)
        default = re.sub(r"[^A-Za-z0-9_.+-]+", "_", root.name).strip("._") if root else "synthetic"
        name = path_component(item.get("name") or default or "data", where, key + ".name")
        out.append(DatasetSpec(name, layout, root, captions, categories, synth, pretrain))
    return out


def _category_names(value: Any, where: str, key: str, every: bool = True) -> tuple[str, ...] | None:
    """A non-empty list of category names; None for "all" where `every` (`categories`), for a missing value where
    not (`pretrain_categories`). An empty list is an error, not "every category": `all` says that."""
    if (every and value == "all") or (not every and value is None):
        return None
    if not isinstance(value, list):
        named = "a list of category names" + (" or 'all'" if every else "")
        raise ConfigError(f"{where}: {key} must be {named}, not {value!r}")
    if not value:
        instead = "write 'all' for every one" if every else "leave the key out"
        raise ConfigError(f"{where}: {key} is empty; name at least one category, or {instead}")
    return tuple(path_component(c, where, key) for c in value)


def _root(value: Any, where: str, key: str, data: str | Path | None) -> Path:
    if not value:
        raise ConfigError(f"{where}: {key} is required (a folder holding category folders)")
    text = str(value)
    if "${DATA}" in text:
        replacement = str(data) if data else os.environ.get("DATA")
        if not replacement:
            raise ConfigError(f"{where}: {key} is {text!r}; give the data root with DATA=/path (make) or --data /path")
        text = text.replace("${DATA}", replacement)
    unresolved = re.findall(r"\$\{(\w+)\}", text)
    for var in unresolved:
        if var not in os.environ:
            raise ConfigError(f"{where}: {key} uses ${{{var}}}, which is not set")
        text = text.replace(f"${{{var}}}", os.environ[var])
    path = Path(text).expanduser()
    if not path.exists():
        raise ConfigError(f"{where}: {key}: {path} does not exist")
    return path


def _methods(value: Any, where: str, check: bool, profile: Profile) -> list[MethodSpec]:
    from harness.methods import discover

    known = discover() if check else {}
    every = value in (None, "all")
    if every:
        if not check:
            raise ConfigError(f"{where}: 'methods: all' needs method discovery")
        value = [name for name, info in known.items() if info.ok and not info.cls.in_progress]
    items = _list(value, where, "methods")
    if not items:
        raise ConfigError(f"{where}: 'methods' is empty")
    out, labels = [], set()
    for i, item in enumerate(items):
        key = f"methods[{i}]"
        if isinstance(item, str):
            item = {"method": item}
        _mapping(item, where, key)
        _keys(item, METHOD_KEYS, where, key + ".")
        _mapping(item.get("config") or {}, where, key + ".config")
        name = str(item.get("method", ""))
        label = _label(item.get("label") or name, where, key + ".label")
        if check:
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}: {key}: unknown method {name!r}{hint}; known: {', '.join(known)}")
            if not known[name].ok:
                raise ConfigError(f"{where}: {key}: method {name!r} is broken: {known[name].error.splitlines()[0]}")
            try:
                known[name].config(profile, item.get("config") or {})
            except ConfigError as err:
                raise ConfigError(f"{where}: {key}.config: {err}") from None
        if label in labels:
            raise ConfigError(f"{where}: {key}: label {label!r} is used twice; give each entry its own 'label'")
        labels.add(label)
        out.append(MethodSpec(label, name, dict(item.get("config") or {}), every))
    return out


def _executor(value: Any, where: str) -> ExecutorSpec:
    _mapping(value, where, "executor")
    _keys(value, EXECUTOR_KEYS, where, "executor.")
    kind = _choice(value.get("kind", "ray"), EXECUTORS, where, "executor.kind")
    num_cpus = value.get("num_cpus")
    if num_cpus is not None:
        num_cpus = _positive_int(num_cpus, where, "executor.num_cpus")
    retries = value.get("max_retries", 2)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ConfigError(f"{where}: executor.max_retries must be an integer >= 0, not {retries!r}")
    address = value.get("address")
    if address is not None and not isinstance(address, str):
        raise ConfigError(f"{where}: executor.address must be HOST:PORT, not {address!r}")
    timeouts = value.get("timeouts") or {}
    _mapping(timeouts, where, "executor.timeouts")
    for job_kind, seconds in timeouts.items():
        _choice(job_kind, tuple(KINDS.names()), where, "executor.timeouts' job kind")
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds < float("inf"):
            raise ConfigError(f"{where}: executor.timeouts.{job_kind} must be a number of seconds > 0, not {seconds!r}")
    return ExecutorSpec(kind, num_cpus, address, retries, dict(timeouts))


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    seeds = _list(value, where, "seeds")
    if not seeds:
        raise ConfigError(f"{where}: 'seeds' is empty; give at least one, e.g. seeds: [0]")
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"{where}: seeds: {seed!r} is not an integer >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds: {seeds} lists a seed twice")
    return tuple(seeds)


def _weights(value: Any, where: str) -> dict:
    """`weights: {network name: file or folder}`, every name known and every value a path."""
    from harness import weights

    _mapping(value, where, "weights")
    known = [*weights.KNOWN, *weights.PIPELINES]
    for name, path in value.items():
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: weights: unknown network {name!r}{hint}; known: {', '.join(known)}")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}: weights.{name} must be a file or folder path, not {path!r}")
    return dict(value)


def _synth(value: Any, where: str, key: str) -> dict:
    from harness.data.synth import SynthConfig

    _mapping(value, where, key)
    _keys(value, SYNTH_KEYS, where, key + ".")
    try:
        SynthConfig(**value)
    except ConfigError as err:
        raise ConfigError(f"{where}: {key}: {str(err).split(': ', 1)[-1]}") from None
    return dict(value)


SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def path_component(value: Any, where: str, key: str) -> str:
    """A name that becomes a folder or file name (suite, data set): letters, digits, '_', '.', '+', '-', not
    starting with '.' (so never '..'), and no path separators."""
    text = str(value)
    if not SAFE_NAME.fullmatch(text):
        raise ConfigError(f"{where}: {key} {text!r} cannot name a folder: use letters, digits, '_', '.', '+' and '-', "
                          "not starting with '.'")
    return text


def _label(value: Any, where: str, key: str) -> str:
    """A method label is shown in tables as written; in file names it is slugged (harness.report.figures)."""
    text = str(value)
    if not text.strip() or any(c in text for c in "/\\\0") or text.startswith(".") or not text.isprintable():
        raise ConfigError(f"{where}: {key} {text!r} must be printable, not start with '.', and hold no '/' or '\\'")
    return text


def _keys(mapping: dict, allowed: set[str], where: str, prefix: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}; allowed: {', '.join(sorted(allowed))}")


def _mapping(value: Any, where: str, key: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping, not {type(value).__name__}")


def _list(value: Any, where: str, key: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: '{key}' must be a list, not {type(value).__name__}")
    return value


def _choice(value: Any, choices: tuple[str, ...], where: str, key: str) -> str:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: {key}: unknown value {value!r}{hint}; choose from {', '.join(choices)}")
    return str(value)


def _positive_int(value: Any, where: str, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: {key} must be a positive integer, not {value!r}")
    return value
