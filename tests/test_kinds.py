"""The typed seams: job kinds' params and where round-trip through JSON with their keys, optional params keep old
keys, no module reads job params by string key, and the registry's errors."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.registry import Registry
from harness.runner.kind import from_json, job_key, optional, to_json
from harness.runner.kinds import KINDS, decode_job
from harness.runner.plan import expand, prepare
from harness.runner.suite import parse_suite
from tests.test_runner import MINI, mini

ROOT = Path(__file__).resolve().parents[1]


def test_every_kinds_jobs_round_trip_through_json_with_their_keys(isolated_cache):
    """A planned job, written as the executor and the manifest receive it, reads back as the same typed params and
    where, and its params hash to the same key (a kind whose JSON lost or renamed a field would not)."""
    raw = mini(methods=["cutpaste", "background_aware", "dfmgan"], protocol="dualanodiff", seeds=[0, 1],
               downstream=[{"name": "segmentation"}, {"name": "classification"}], detectors=["padim"])
    raw["datasets"][0]["categories"] = ["tray"]
    jobs = expand(prepare(parse_suite(raw, MINI)))
    assert {j.kind for j in jobs} >= {"pretrain", "fit", "generate", "score", "segment", "classify", "detect"}
    for job in jobs:
        again = decode_job(job.as_dict())
        assert again == job, job.label
        assert job_key(job.kind, again.params, again.deps) == job.key
        assert isinstance(job.params, KINDS[job.kind].params_type)
    detect = next(j for j in jobs if j.kind == "detect")
    assert detect.params.test_images == "cv2-bilinear"  # a compat protocol's detector reads as the published code


def test_an_optional_param_keeps_the_keys_of_jobs_that_do_not_set_it():
    @dataclass(frozen=True)
    class Before:
        a: int

    @dataclass(frozen=True)
    class After:
        a: int
        b: str | None = optional()

    assert job_key("fit", Before(1), ()) == job_key("fit", After(1), ())
    assert job_key("fit", After(1, "x"), ()) != job_key("fit", After(1), ())
    assert to_json(After(1)) == {"a": 1}
    with pytest.raises(ConfigError, match=r"unknown keys \['c'\]"):
        from_json(After, {"a": 1, "c": 2}, "fit x")


def test_a_kind_refuses_params_of_another_kind():
    fit = KINDS["fit"]
    with pytest.raises(TypeError, match="not FitParams"):
        fit.job("fit x", {"method": "cutpaste"})


def _is_job(node: ast.AST) -> bool:
    """`job` or `state["job"]`: a job as JSON (a checkpoint's "params" is not a job's)."""
    return (isinstance(node, ast.Name) and node.id == "job") or (
        isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "job")


def _string_key_reads(path: Path) -> list[str]:
    """`x.params["k"]`, `x.params.get("k")`, `job["params"]`, `job.inputs`: reads of job params by string key."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        target = None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            target = node.value
            if node.slice.value == "params" and _is_job(node.value):
                found.append(f"{path.name}:{node.lineno}")
                continue
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            target = node.func.value
        elif isinstance(node, ast.Attribute) and node.attr == "inputs" and isinstance(node.value, ast.Name) \
                and node.value.id == "job":
            found.append(f"{path.name}:{node.lineno}")
        if isinstance(target, ast.Attribute) and target.attr == "params":
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_module_reads_job_params_by_string_key():
    """Params are read through each kind's dataclass; only the kind's own JSON decoding (kind.py) reads the key."""
    reads = [r for path in sorted((ROOT / "harness").rglob("*.py")) if path.name != "kind.py"
             and "synth" not in path.parts for r in _string_key_reads(path)]
    assert reads == []


def test_the_string_key_check_finds_a_read(tmp_path):
    """Negative control: the check on code that reads params as the runner once did."""
    code = tmp_path / "old.py"
    code.write_text("def run(job, ctx):\n    p = job.inputs\n    return job.params['resolution'], job['params']\n")
    assert len(_string_key_reads(code)) == 3


def test_the_registry_names_what_is_wrong():
    registry: Registry[int] = Registry("widget", int)
    registry.add("spanner", 1)
    registry.add("lazy", "math:inf")  # resolved (imported) on first use only
    with pytest.raises(ConfigError, match="widget 'spanner' is registered twice"):
        registry.add("spanner", 2)
    with pytest.raises(ConfigError, match=r"unknown widget 'spaner'; did you mean 'spanner'\?"):
        registry["spaner"]
    with pytest.raises(ConfigError, match="is a float, not a int"):
        registry["lazy"]


def test_the_job_kinds_are_registered_once_and_in_plan_order():
    assert KINDS.names()[:5] == ["backbone", "pretrain", "fit", "generate", "score"]
    with pytest.raises(ConfigError, match="job kind 'fit' is registered twice"):
        KINDS.add("fit", "harness.runner.kinds.score:SCORE")


def test_a_methods_hash_follows_its_code_and_settings_not_its_tests_or_markdown(tmp_path):
    """The measured numbers rendered into a method's README, and its tests, recompute nothing; its code and its
    method.yaml do (and so do those of a method it builds on)."""
    from harness.runner.kinds.generation import method_hash

    method, base = tmp_path / "method", tmp_path / "base"
    for folder in (method, method / "tests", base):
        folder.mkdir()
        (folder / "code.py").write_text("x = 1\n")
    (method / "README.md").write_text("fit: 12 s\n")
    first = method_hash(method, [base])
    (method / "README.md").write_text("fit: 13 s\n")
    (method / "tests" / "code.py").write_text("x = 2\n")
    assert method_hash(method, [base]) == first
    for edited in (method / "code.py", base / "code.py"):
        edited.write_text("x = 3\n")
        assert method_hash(method, [base]) != first
        edited.write_text("x = 1\n")
    (method / "method.yaml").write_text("defaults: {}\n")
    assert method_hash(method, [base]) != first
