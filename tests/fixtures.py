"""Shared fixtures: a small synthetic data set, the real data in ../shared/data, an isolated cache, and a Ray
instance started before the first test that must still run after the last one."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]  # tests/ is one level down
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Caches (random weight files, Inception features, synthetic sets) go to a temporary folder."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("DEFECTBENCH_CACHE")
    os.environ["DEFECTBENCH_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("DEFECTBENCH_CACHE", None)
    else:
        os.environ["DEFECTBENCH_CACHE"] = old


BYSTANDER_TEST = "test_a_ray_started_before_the_tests_is_alive_after_them"


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(config, items):
    """The bystander check runs last."""
    last = [item for item in items if item.name == BYSTANDER_TEST]
    items[:] = [item for item in items if item not in last] + last


@pytest.fixture(scope="session", autouse=True)
def bystander_ray(request):
    """When the bystander check is among the tests: a Ray instance started before the first test runs, as a user's
    running suite would be (started by none of the tests), whose processes the check finds alive after the last."""
    if not any(item.name == BYSTANDER_TEST for item in request.session.items):
        yield None
        return
    from tests.ray_nodes import ray_nodes

    with ray_nodes(count=1, cpus=0) as nodes:
        yield nodes.processes()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """The synthetic data set at 64 px with few images per part (fast to write and to read)."""
    from harness.data.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, SynthConfig(seed=0, size=64, n_train=12, n_validation=3, n_test_good=4, n_defect=6))
    return root


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: the real data in ../shared/data is needed for this test")
    return path


@pytest.fixture(scope="session")
def pretrained_backbone() -> tuple[Path, dict]:
    """The shipped tiny backbone (backbones/defectbench-tiny): (folder, its training record)."""
    import json

    from harness.diffusion import shipped

    return shipped.SHIPPED, json.loads((shipped.SHIPPED / shipped.TRAINING_FILE).read_text())


@pytest.fixture(scope="session")
def sd15_rehearsal(tmp_path_factory) -> Path:
    """A random model in Stable Diffusion 1.5's layout, widths reduced, saved as the hub's folder (tests/rehearsal.py):
    what the `paper` profile's code paths are rehearsed on."""
    from tests.rehearsal import stable_diffusion_15

    return stable_diffusion_15(tmp_path_factory.mktemp("sd15") / "model")


def method_modules(name: str, *helpers: str) -> tuple:
    """A method's module (as discovery imported it) and its helper modules, for tests that reach inside."""
    import importlib
    import sys

    from harness.methods import get_method_info

    method = sys.modules[get_method_info(name).cls.__module__]
    return method, *(importlib.import_module(f"{method.__package__}.{helper}") for helper in helpers)
