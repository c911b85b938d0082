"""Method plugins: discovery, configs, the three model-free baselines, targets, and the generation driver."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from harness import GeneratedSample, Method
from harness.data import read_category
from harness.data.splits import make_split
from harness.errors import ConfigError, DataError, MethodError
from harness.data.samples import read_samples
from harness.generation import fit_method, generate_to
from harness.imaging import estimate_foreground, jitter_mask
from harness.methods import REPO_METHODS_DIR, discover, get_method_info, load_method
from harness.profiles import get_profile
from harness.tasks import build_request, build_task

BASELINES = ("cutpaste", "croppaste", "draem")


def test_discovery_lists_the_baselines():
    methods = discover()
    for name in BASELINES:
        assert methods[name].ok, methods[name].error
        assert methods[name].cls.paper
        assert (REPO_METHODS_DIR / name / "README.md").is_file()


def test_a_broken_method_is_named_and_hides_nothing(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "method.yaml").write_text("defaults: {}\n")
    (broken / "method.py").write_text("from harness import Method\nclass Broken(Method):\n    name = 'broken'\n    def oops(:\n")
    no_yaml = tmp_path / "noyaml"
    no_yaml.mkdir()
    (no_yaml / "method.py").write_text("")
    methods = discover([tmp_path, REPO_METHODS_DIR])
    assert not methods["broken"].ok and "SyntaxError" in methods["broken"].error
    assert not methods["noyaml"].ok and "missing method.yaml" in methods["noyaml"].error
    assert all(methods[name].ok for name in BASELINES)
    with pytest.raises(MethodError, match=str(broken)):
        get_method_info("broken", [tmp_path])


def _method_dir(root, name: str, yaml_text: str, generate_body: str, header: str = "", **helpers: str):
    """A method directory `root/name` whose generate() runs `generate_body` per target (with `image` to yield)."""
    folder = root / name
    folder.mkdir()
    (folder / "method.yaml").write_text(yaml_text)
    for module, text in helpers.items():
        (folder / f"{module}.py").write_text(text)
    body = textwrap.indent(textwrap.dedent(generate_body).strip(), " " * 12)
    (folder / "method.py").write_text(
        f"from harness import GeneratedSample, Method\n{header}\n"
        f"class {name.title()}(Method):\n"
        f"    name = {name!r}\n"
        f"    needs = frozenset({{'target_normal', 'target_mask'}})\n"
        f"    def generate(self, request, workdir):\n"
        f"        for target in request.targets:\n{body}\n"
        f"            yield GeneratedSample.on_target(target, image, target.mask, request.defect_type)\n")
    return folder


def test_a_new_method_is_a_directory(tmp_path):
    _method_dir(tmp_path, "identity", "defaults:\n  gain: 1.0\nprofiles:\n  paper:\n    gain: 2.0\n",
                "image = target.normal.image")
    methods = discover([tmp_path, REPO_METHODS_DIR])
    assert methods["identity"].ok and set(BASELINES) <= set(methods)
    assert load_method("identity", "paper", dirs=[tmp_path]).config == {"gain": 2.0}


def test_discovering_another_folder_beside_the_methods_keeps_their_classes(tmp_path):
    """A plugin folder (DEFECTBENCH_METHODS_PATH) discovered beside methods/ finds the same packages, so code that
    imported a method before (its tests, a running suite) and code that looks it up now agree on its classes."""
    before = discover()["draem"].cls
    _method_dir(tmp_path, "identity", "defaults: {}\n", "image = target.normal.image")
    assert discover([tmp_path, REPO_METHODS_DIR])["draem"].cls is before
    assert sys.modules[before.__module__].__file__ == str(REPO_METHODS_DIR / "draem" / "method.py")


def test_a_method_directory_is_a_package_with_its_own_helper_modules(tmp_path):
    """methods/<name>/ may keep helper modules beside method.py and import them relatively (DRAEM's noise.py); a
    refreshed discovery reads an edited helper afresh."""
    folder = _method_dir(tmp_path, "darken", "defaults: {}\n", """
        image = target.normal.image.copy()
        image[target.mask] = (image[target.mask] * FACTOR).astype(image.dtype)
    """, header="from .shade import FACTOR", shade="FACTOR = 0.5\n")
    info = discover([tmp_path], refresh=True)["darken"]
    assert info.ok, info.error
    assert info.cls.__module__ == "defectbench_methods.darken"
    assert discover()["draem"].ok  # the repository's DRAEM imports its own noise.py so
    (folder / "shade.py").write_text("FACTOR = 0.25\n")
    assert sys.modules["defectbench_methods.darken.shade"].FACTOR == 0.5
    discover([tmp_path], refresh=True)
    assert sys.modules["defectbench_methods.darken.shade"].FACTOR == 0.25


def test_unknown_method_and_unknown_setting():
    with pytest.raises(MethodError, match="unknown method 'nope'"):
        load_method("nope")
    with pytest.raises(ConfigError, match="unknown key 'blendd'"):
        load_method("croppaste", overrides={"blendd": "alpha"})
    assert load_method("croppaste", overrides={"blend": "poisson"}).config["blend"] == "poisson"


@pytest.fixture(scope="module")
def washer(synth_root):
    category = read_category(synth_root, "washer")
    return category, make_split(category)


def _run(name, split, defect, tmp_path, n=5, seed=0, **overrides):
    method = load_method(name, "tiny", overrides)
    task = build_task(split, [defect], 64, seed)
    workdir = tmp_path / f"{name}-fit"
    fit_method(method, task, workdir)
    return generate_to(method, task, defect, n, seed, tmp_path / f"{name}-{seed}", workdir, progress=False)


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_generate_reproducibly(name, washer, tmp_path):
    category, split = washer
    out = _run(name, split, "chip", tmp_path)
    rows = read_samples(out)
    assert len(rows) == 5
    train_normals = {s.key for s in split.normal_train}
    for row in rows:
        image = np.asarray(Image.open(out / row["image"]))
        mask = np.asarray(Image.open(out / row["mask"])) > 0
        assert image.shape == (64, 64, 3) and mask.any()
        assert row["normal_id"] in train_normals and row["defect_type"] == "chip"
    again = _run(name, split, "chip", tmp_path / "again")
    assert all((out / r["image"]).read_bytes() == (again / r["image"]).read_bytes() for r in rows)
    other = _run(name, split, "chip", tmp_path, seed=1)
    assert any((out / r["image"]).read_bytes() != (other / r["image"]).read_bytes() for r in rows)
    meta = json.loads((out / "generation.json").read_text())
    assert meta["method"] == name and meta["n"] == 5


def test_croppaste_pastes_training_defects_only(washer, tmp_path):
    _, split = washer
    for blend in ("alpha", "poisson"):
        rows = read_samples(_run("croppaste", split, "crack", tmp_path / blend, n=6, blend=blend))
        train = {s.key for s in split.defects["crack"].train}
        assert {r["mask_id"] for r in rows} <= train


def test_task_holds_no_test_images(washer):
    _, split = washer
    task = build_task(split, ["crack", "stain"], 64, 0)
    train = {s.key for d in ("crack", "stain") for s in split.defects[d].train}
    test = {s.key for d in split.defects for s in split.defects[d].test}
    assert {a.id for a in task.anomalies} == train
    assert not {a.id for a in task.anomalies} & test
    assert not {n.id for n in task.normals} & {s.key for s in split.normal_validation}


def test_target_masks_come_from_training_masks_and_stay_on_the_object(washer):
    _, split = washer
    task = build_task(split, ["stain"], 64, 0)
    method = load_method("cutpaste")
    method.needs = frozenset({"target_normal", "target_mask"})
    request = build_request(task, method, "stain", 12, seed=3)
    train_ids = {a.id for a in task.anomalies_of("stain")}
    for target in request.targets:
        assert target.mask_source in train_ids
        assert target.mask.any()
        assert not (target.mask & ~target.normal_foreground).any()
    areas = [t.mask.sum() for t in request.targets]
    assert len(set(areas)) > 1  # jittered, not copies


def test_foreground_estimate_finds_the_washer(washer):
    category, _ = washer
    image = category.train_good[0].load_image(64)
    foreground = estimate_foreground(image, texture=False)
    assert 0.15 < foreground.mean() < 0.6
    assert not foreground[0, 0] and not foreground[32, 32]  # background corner, the washer's hole
    assert estimate_foreground(image, texture=True).all()


def test_jitter_mask_keeps_size_roughly():
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), bool)
    mask[10:20, 10:30] = True
    foreground = np.ones((64, 64), bool)
    moved = jitter_mask(rng, mask, foreground)
    assert 0.5 * mask.sum() < moved.sum() < 1.6 * mask.sum()


def test_captions_are_required_when_needed(washer, tmp_path):
    _, split = washer
    task = build_task(split, ["chip"], 64, 0)
    task.anomalies = [dataclasses.replace(a, caption=None) for a in task.anomalies]
    method = load_method("cutpaste")
    method.needs = frozenset({"caption"})
    with pytest.raises(DataError, match="needs captions"):
        build_request(task, method, "chip", 2, 0)


class _Failing(Method):
    name = "failing"
    needs = frozenset({"target_normal"})

    def __init__(self, fail_at: int | None, count: int):
        super().__init__({}, get_profile("tiny"))
        self.fail_at, self.count = fail_at, count

    def generate(self, request, workdir):
        for i, target in enumerate(request.targets[: self.count]):
            if i == self.fail_at:
                raise RuntimeError("boom")
            yield GeneratedSample.on_target(target, target.normal.image, np.ones((64, 64), bool), request.defect_type)


def test_failed_generation_leaves_nothing(washer, tmp_path):
    _, split = washer
    task = build_task(split, ["chip"], 64, 0)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        generate_to(_Failing(2, 5), task, "chip", 5, 0, out, tmp_path, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(MethodError, match="made 3 samples"):
        generate_to(_Failing(None, 3), task, "chip", 5, 0, out, tmp_path, progress=False)
    assert not out.exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
