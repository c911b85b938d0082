"""The Method interface, the types it exchanges with the harness, and discovery of `methods/<name>/`.

A method is a directory holding `method.py` (one subclass of `Method`), `method.yaml` (`defaults:` and
per-profile overrides under `profiles:`) and `README.md`, and any helper modules it imports relatively (the
directory is imported as a package). Dropping a directory in adds a method.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import os
import sys
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import yaml

from harness.errors import ConfigError, MethodError
from harness.profiles import Profile, get_profile
from harness.registry import Registry
from harness.seeding import stream

NEEDS = frozenset({"target_normal", "target_mask", "caption"})
GRANULARITIES = ("defect_type", "category")
REPO_METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"


@dataclass(frozen=True)
class Item:
    """An image handed to a method: pixels at the profile's resolution and where they came from."""

    id: str  # the sample key in its category, e.g. "train/good/012" or "test/crack/003"
    image: np.ndarray  # uint8 (H, W, 3)
    defect_type: str
    mask: np.ndarray | None = None  # bool (H, W); training anomalies only
    caption: str | None = None
    path: Path | None = None


@dataclass
class FewShotTask:
    """What `fit` sees: the training part of a split, never its test part."""

    dataset: str
    category: str
    defect_types: list[str]
    anomalies: list[Item]  # the generator-training anomalies of every defect type in `defect_types`
    normals: list[Item]  # the normal training images
    resolution: int
    texture: bool | None  # True for textures, False for objects, None if unknown
    seed: int
    other_normals: dict[str, list[Path]] = field(default_factory=dict)  # train/good of the other categories
    backbone: Path | None = None  # the diffusion backbone folder (diffusers layout), for methods with uses_backbone
    pretrained: Path | None = None  # what Method.pretrain wrote for this category, for methods with `pretrains`
    fold: int = 0
    root: Path | None = None  # the category's folder; item paths are recorded relative to it

    def anomalies_of(self, defect_type: str) -> list[Item]:
        return [a for a in self.anomalies if a.defect_type == defect_type]

    def rng(self, *keys: int | str) -> np.random.Generator:
        """A random stream for fitting, its own for every data set, category, defect types, fold and seed."""
        return stream(self.seed, "fit", self.dataset, self.category, *self.defect_types, self.fold, *keys)


@dataclass
class Target:
    """One generation target; fields are filled as the method's `needs` ask."""

    normal: Item | None = None
    normal_foreground: np.ndarray | None = None  # bool (H, W): where on `normal` a defect may land
    mask: np.ndarray | None = None  # bool (H, W), a training mask moved onto the normal image's foreground
    mask_source: str | None = None  # the training anomaly the mask came from
    caption: str | None = None
    caption_source: str | None = None


@dataclass
class GenerationRequest:
    defect_type: str
    n: int
    seed: int
    targets: list[Target]  # exactly n
    dataset: str = ""
    category: str = ""
    fold: int = 0
    root: Path | None = None  # the category's folder on this machine
    backbone: Path | None = None  # the diffusion backbone folder on this machine, for methods with uses_backbone

    def rng(self, *keys: int | str) -> np.random.Generator:
        """The random stream of sample `keys[0]` (and any further keys): its own for every data set, category,
        defect type, fold and seed, and the same in every rerun on any machine."""
        return stream(self.seed, "generate", self.dataset, self.category, self.defect_type, self.fold, *keys)


@dataclass
class GeneratedSample:
    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # bool (H, W): produced by the method or the target mask it was given
    defect_type: str
    normal_id: str | None = None
    mask_id: str | None = None
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # what of this sample a stand-in made instead of the method's own part (e.g. "mask: the target's, the mask
    # generator gave too few"); None: all the method's. Scores and downstream models computed from such samples
    # say so in their records and the leaderboard (harness.data.samples.stand_in_summary).
    stand_in: str | None = None

    @classmethod
    def on_target(cls, target: Target, image: np.ndarray, mask: np.ndarray, defect_type: str,
                  **extra: Any) -> "GeneratedSample":
        """A sample made on `target`, recording which normal image, mask and caption it came from."""
        return cls(image=image, mask=mask, defect_type=defect_type,
                   normal_id=target.normal.id if target.normal else None,
                   mask_id=target.mask_source, caption=target.caption, extra=dict(extra))


class Method:
    """Base class of every generator. Subclasses set the class attributes and implement fit/generate."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    granularity: ClassVar[str] = "defect_type"  # one model per defect type, or one per category
    needs: ClassVar[frozenset[str]] = frozenset()  # subset of NEEDS
    # CPUs a job of this method uses; num_gpus > 0: it runs networks and gets the profile's share of a GPU where
    # the cluster has GPUs (harness.runner.kind.job_resources). Either one dict for every profile or one per
    # profile name ({"tiny": {...}, "paper": {...}}); see resources_for.
    resources: ClassVar[dict] = {"num_cpus": 1, "num_gpus": 0}
    # the diffusion backbone it fine-tunes, by its name in harness/weights.py (PIPELINES), e.g.
    # "stable-diffusion-v1-5"; the `paper` profile loads it, the `tiny` profile hands the shipped tiny stand-in
    # (FewShotTask.backbone). None: the method uses no backbone.
    backbone: ClassVar[str | None] = None
    uses_backbone: ClassVar[bool] = False  # set from `backbone`
    # non-empty: what the method still lacks. `methods: all` leaves it out (so no leaderboard shows an unfinished
    # method by default) and `defectbench methods` says why; a suite that names it runs it.
    in_progress: ClassVar[str] = ""
    # the methods (directories under methods/) whose code this one extends (method_package): their files count in
    # its job keys, so that editing a base recomputes the methods built on it
    builds_on: ClassVar[tuple[str, ...]] = ()
    # settings whose values are not all of their default's type, by key path -> the types they take (e.g.
    # {"adaptive_mask": (bool, str)}): check_types accepts those; the method checks their values itself
    setting_types: ClassVar[dict[str, tuple[type, ...]]] = {}
    # True: the method first learns from a category's normal images alone (`pretrain`, e.g. DFMGAN's stage 1), once
    # per category, fold and seed; its fits of that category read the result (FewShotTask.pretrained)
    pretrains: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.uses_backbone = cls.backbone is not None

    @classmethod
    def resources_for(cls, profile: str) -> dict[str, float]:
        """The resources of one job of this method in `profile` (defaults: 1 CPU, no GPU)."""
        per_profile = isinstance(next(iter(cls.resources.values()), None), dict)
        chosen = cls.resources.get(profile, {}) if per_profile else cls.resources
        return {"num_cpus": 1, "num_gpus": 0, **chosen}

    def __init__(self, config: dict[str, Any], profile: Profile):
        self.config = config
        self.profile = profile

    def working_resolution(self, profile_resolution: int) -> int:
        """The size (px) of the images this method works on: its config's `resolution` where it has one (e.g. 512
        for Stable Diffusion 1.5), else the profile's. The harness loads the task at this size, so the method sees
        content at its own resolution, not an upsampled copy, and brings the samples back to the profile's size."""
        return int(self.config.get("resolution") or profile_resolution)

    @classmethod
    def pretrain_settings(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The part of the config `pretrain` reads: fits whose configs agree on it share one pretraining."""
        return config

    def pretrain(self, task: FewShotTask, workdir: Path) -> None:
        """With `pretrains`: learn from task.normals (task.anomalies is empty) into workdir."""
        raise NotImplementedError

    def fit(self, task: FewShotTask, workdir: Path) -> None:
        """Learn from the few training anomalies and the normal images; save what generate needs in workdir."""

    def generate(self, request: GenerationRequest, workdir: Path) -> Iterator[GeneratedSample]:
        raise NotImplementedError


# ---- discovery ------------------------------------------------------------------------------------------


@dataclass
class MethodInfo:
    """A discovered method directory; `error` is set (and `cls` None) when it could not be loaded."""

    name: str
    directory: Path
    cls: type[Method] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def config(self, profile: str | Profile, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """defaults <- profiles[profile] <- overrides; an override key absent from the defaults, or of another type
        than the profile's value (check_types), is an error."""
        profile = get_profile(profile)
        where = f"overrides for method {self.name!r}"
        config = merge_config(copy.deepcopy(self.defaults), self.profiles.get(profile.name, {}), f"{self.name}.yaml")
        check_types(overrides or {}, config, self.defaults, where, getattr(self.cls, "setting_types", {}))
        return merge_config(config, overrides or {}, where)


def merge_config(base: dict, update: dict, where: str, prefix: str = "") -> dict:
    """`update` merged into `base` (nested); a key that `base` does not have is a ConfigError."""
    for key, value in update.items():
        if key not in base:
            known = ", ".join(sorted(base)) or "(none)"
            raise ConfigError(f"{where}: unknown key {prefix + key!r}; known keys: {known}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            base[key] = merge_config(base[key], value, where, prefix + key + ".")
        else:
            base[key] = copy.deepcopy(value)
    return base


def check_types(given: dict, expected: dict, defaults: dict, where: str, types: dict | None = None,
                prefix: str = "") -> None:
    """Each value of `given` is of the type of its key's value in `expected` (an int where a float is; mappings key by
    key; a list's items as its first item), so a mistyped setting fails when a suite is read, not in every job.
    Any value is taken where `defaults` holds null (null marks an optional or automatic setting, e.g. resolution)
    and null where `expected` holds a mapping (a part switched off: text_lora: null); `types` (key path -> types)
    names settings of several types. Unknown keys are left to merge_config."""
    for key, value in given.items():
        path = prefix + str(key)
        if key not in expected or defaults.get(key) is None or expected[key] is None:
            continue
        default, allowed = expected[key], (types or {}).get(path)
        if isinstance(default, dict) and value is None:
            continue
        if isinstance(default, dict) and isinstance(value, dict):
            inner = defaults[key] if isinstance(defaults[key], dict) else {}
            check_types(value, default, inner, where, types, path + ".")
        elif not (isinstance(value, allowed) if allowed else _of_type(value, default)):
            kind = " or ".join(t.__name__ for t in allowed) if allowed else _kind(default)
            raise ConfigError(f"{where}: {path!r} must be {kind} (its default is {default!r}), not {value!r}")


_KINDS = {bool: ("true or false", "true/false values"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), list: ("a list", "lists"), dict: ("a mapping", "mappings")}


def _of_type(value: Any, default: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):  # bool is an int to Python, not to a setting
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, list):
        return isinstance(value, list) and (not default or all(_of_type(item, default[0]) for item in value))
    return isinstance(value, type(default))


def _kind(default: Any, plural: bool = False) -> str:
    name = _KINDS.get(type(default), (type(default).__name__,) * 2)[plural]
    return name + (f" of {_kind(default[0], plural=True)}" if isinstance(default, list) and default else "")


def methods_dirs() -> list[Path]:
    """The repository's methods/ folder plus any folders in $DEFECTBENCH_METHODS_PATH."""
    extra = [Path(p) for p in os.environ.get("DEFECTBENCH_METHODS_PATH", "").split(os.pathsep) if p]
    return [*extra, REPO_METHODS_DIR]


_DISCOVERED: dict[tuple[str, ...], Registry[MethodInfo]] = {}


def discover(dirs: list[Path] | None = None, refresh: bool = False) -> Registry[MethodInfo]:
    """Every method directory found; a broken one is reported with its error and does not hide the others.

    Loaded once per process and set of folders (`refresh=True` reloads)."""
    roots = list(dirs) if dirs is not None else methods_dirs()
    key = tuple(str(r) for r in roots)
    if refresh or key not in _DISCOVERED:
        _DISCOVERED[key] = _discover(roots, refresh)
    return _DISCOVERED[key]


def _discover(roots: list[Path], reload: bool = False) -> Registry[MethodInfo]:
    found: dict[str, MethodInfo] = {}
    for root in roots:  # a folder listed earlier wins: $DEFECTBENCH_METHODS_PATH before methods/
        if not root.is_dir():
            continue
        for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            if directory.name not in found:
                found[directory.name] = _load_info(directory, reload)
    methods: Registry[MethodInfo] = Registry("method", MethodInfo, hint=f" (folders: {', '.join(map(str, roots))})")
    for name, info in sorted(found.items()):
        methods.add(name, info)
    return methods


def _load_info(directory: Path, reload: bool = False) -> MethodInfo:
    info = MethodInfo(name=directory.name, directory=directory)
    try:
        info.defaults, info.profiles = _read_yaml(directory / "method.yaml")
        info.cls = _load_class(directory, reload)
        if info.cls.name != directory.name:
            raise MethodError(f"class {info.cls.__name__} has name {info.cls.name!r}, but its directory is {directory.name!r}")
        _check_class(info.cls)
    except Exception as err:  # any failure of one method is reported and does not stop discovery
        info.cls = None
        info.error = f"{type(err).__name__}: {err}"
        if not isinstance(err, (MethodError, ConfigError)):
            info.error += "\n" + "".join(traceback.format_exception(err)[-3:])
    return info


def _read_yaml(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise MethodError(f"{path}: missing method.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise MethodError(f"{path}: invalid YAML ({err})") from None
    unknown = set(data) - {"defaults", "profiles"}
    if unknown:
        raise MethodError(f"{path}: unknown top-level keys {sorted(unknown)}; expected 'defaults' and 'profiles'")
    return dict(data.get("defaults") or {}), dict(data.get("profiles") or {})


PACKAGE = "defectbench_methods"  # methods/<name>/ is imported as the package defectbench_methods.<name>


def _load_class(directory: Path, reload: bool = False) -> type[Method]:
    """Import methods/<name>/ as a package whose top module is method.py, so a method may keep helper modules
    beside it (`from .noise import perlin`) and code that serves one method lives in its directory."""
    source = directory / "method.py"
    module = _import_package(directory, reload)
    module_name = module.__name__
    classes = [obj for obj in vars(module).values()
               if inspect.isclass(obj) and issubclass(obj, Method) and obj is not Method and obj.__module__ == module_name]
    if len(classes) != 1:
        raise MethodError(f"{source}: expected exactly one subclass of harness.Method, found {len(classes)}")
    return classes[0]


def _import_package(directory: Path, reload: bool = False) -> types.ModuleType:
    """The method's package, imported once per process: discovering other folders beside it (a plugin path) finds the
    same module and so the same classes; `reload` (discover(refresh=True)) imports it and its helpers afresh."""
    source = directory / "method.py"
    if not source.is_file():
        raise MethodError(f"{source}: missing method.py")
    sys.modules.setdefault(PACKAGE, types.ModuleType(PACKAGE))
    module_name = f"{PACKAGE}.{directory.name}"
    loaded = sys.modules.get(module_name)
    if not reload and loaded is not None and getattr(loaded, "__file__", None) == str(source):
        return loaded
    for loaded in [m for m in sys.modules if m == module_name or m.startswith(module_name + ".")]:
        del sys.modules[loaded]  # a reload (discover(refresh=True)) imports the helpers afresh too
    spec = importlib.util.spec_from_file_location(module_name, source, submodule_search_locations=[str(directory)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(module_name, None)
        raise
    return module


def method_package(name: str) -> types.ModuleType:
    """The package of another method (`methods/<name>/`, imported as defectbench_methods.<name>), for a method built
    on it: `method_package("anomalydiffusion").AnomalyDiffusion` is a base class to extend, and its helper modules
    are importable as `defectbench_methods.anomalydiffusion.<module>` afterwards. Imported once per process."""
    loaded = sys.modules.get(f"{PACKAGE}.{name}")
    if loaded is not None:
        return loaded
    for root in methods_dirs():
        if (root / name / "method.py").is_file():
            return _import_package(root / name)
    raise MethodError(f"method {name!r} (a base of another method) not found in {[str(r) for r in methods_dirs()]}")


def _check_class(cls: type[Method]) -> None:
    if cls.granularity not in GRANULARITIES:
        raise MethodError(f"{cls.__name__}.granularity must be one of {GRANULARITIES}, not {cls.granularity!r}")
    unknown = set(cls.needs) - NEEDS
    if unknown:
        raise MethodError(f"{cls.__name__}.needs has unknown inputs {sorted(unknown)}; known: {sorted(NEEDS)}")


def get_method_info(name: str, dirs: list[Path] | None = None) -> MethodInfo:
    methods = discover(dirs)
    if name not in methods:
        raise MethodError(methods.unknown(name))
    info = methods[name]
    if not info.ok:
        raise MethodError(f"method {name!r} in {info.directory} is broken: {info.error}")
    return info


def load_method(name: str, profile: str | Profile = "tiny", overrides: dict[str, Any] | None = None,
                dirs: list[Path] | None = None) -> Method:
    info = get_method_info(name, dirs)
    profile = get_profile(profile)
    return info.cls(info.config(profile, overrides), profile)
