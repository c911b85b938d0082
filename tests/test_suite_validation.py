"""Issue 38: suite values that were accepted, and failed in every job or ran until memory ran out, are errors when
the suite is read, each naming the file, the key and what is wrong."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.runner.suite import load_suite, parse_suite
from tests.test_runner import MINI, mini

SUITE = Path("suites/x.yaml")


def _error(**changes) -> str:
    with pytest.raises(ConfigError) as info:
        parse_suite(mini(**changes), SUITE)
    return str(info.value)


# ---- a method's settings: of their default's type ----------------------------------------------------------------


@pytest.mark.parametrize("config,message", [
    ({"feather_sigma": "x"}, "'feather_sigma' must be a number (its default is 1.0), not 'x'"),
    ({"flip": 1}, "'flip' must be true or false (its default is True), not 1"),
    ({"max_rotation": 12.5}, "'max_rotation' must be an integer (its default is 30), not 12.5"),
    ({"scale": 1.2}, "'scale' must be a list of numbers (its default is [0.8, 1.2]), not 1.2"),
    ({"scale": [0.8, "x"]}, "'scale' must be a list of numbers"),
])
def test_a_method_setting_of_another_type_names_the_file_method_and_key(config, message):
    text = _error(methods=[{"method": "croppaste", "config": config}])
    assert text.startswith("suites/x.yaml: methods[0].config: overrides for method 'croppaste': ") and message in text


def test_nested_settings_are_checked_against_the_profiles_values():
    methods = [{"method": "dualanodiff", "config": {"bcm": {"hidden": "wide"}}}]
    assert "'bcm.hidden' must be an integer (its default is 64), not 'wide'" in _error(methods=methods)
    assert "'bcm.hidden' must be an integer (its default is 320)" in _error(methods=methods, profile="paper")
    assert "'bcm' must be a mapping" in _error(methods=[{"method": "dualanodiff", "config": {"bcm": True}}])


def test_a_method_config_that_is_no_mapping_is_named():
    assert "methods[0].config must be a mapping, not int" in _error(methods=[{"method": "cutpaste", "config": 3}])


def test_settings_that_fit_their_defaults_are_accepted():
    suite = parse_suite(mini(methods=[
        {"method": "croppaste", "config": {"feather_sigma": 2}},  # an int where a float is
        {"method": "draem", "config": {"source_path": "/textures"}},  # a null default takes any value
        {"method": "dualanodiff", "config": {"text_lora": None, "lora": {"alpha": 16}}},  # a part switched off
        {"method": "anomalydiffusion", "config": {"adaptive_mask": True}},  # true, false or textures (setting_types)
    ]), SUITE)
    assert [m.config for m in suite.methods][0] == {"feather_sigma": 2}


# ---- downstream models, detectors and the backbone's fine-tuning: types and ranges -------------------------------


@pytest.mark.parametrize("change,message", [
    ({"downstream": [{"name": "segmentation", "config": {"epochs": -1}}]},
     "downstream[0].config: settings of 'segmentation': 'epochs' must be a positive integer, not -1"),
    ({"downstream": [{"name": "segmentation", "config": {"epochs": "x"}}]},
     "'epochs' must be an integer (its default is 6), not 'x'"),
    ({"downstream": [{"name": "segmentation", "config": {"p_generated": 1.5}}]}, "'p_generated' must lie in [0, 1]"),
    ({"downstream": [{"name": "classification", "config": {"validation_fraction": 1}}]},
     "'validation_fraction' must lie in [0, 1), not 1"),
    ({"downstream": [{"name": "classification", "config": {"lr": -0.1}}]}, "'lr' must be at least 0, not -0.1"),
    ({"downstream": [{"name": "classification", "config": 5}]}, "downstream[0] must be a name or a mapping"),
    ({"detectors": [{"name": "padim", "config": {"max_epochs": 0}}]},
     "detectors[0].config: settings of 'padim': 'max_epochs' must be a positive integer, not 0"),
    ({"backbone": {"unet_steps": 0}}, "backbone.unet_steps: 0 must be at least 1"),
])
def test_downstream_and_backbone_settings_are_checked_for_type_and_range(change, message):
    text = _error(**change)
    assert text.startswith("suites/x.yaml: ") and message in text


# ---- categories: a list of names, or all --------------------------------------------------------------------------


@pytest.mark.parametrize("key,value,message", [
    ("categories", [], "datasets[0].categories is empty; name at least one category, or write 'all' for every one"),
    ("categories", None, "datasets[0].categories must be a list of category names or 'all', not None"),
    ("pretrain_categories", [], "datasets[0].pretrain_categories is empty; name at least one category, or leave the"),
])
def test_an_empty_category_list_is_an_error_not_every_category(key, value, message):
    assert message in _error(datasets=[{"name": "synthetic", "layout": "synthetic", key: value}])


def test_every_category_is_spelt_all_or_the_key_left_out():
    for data in ({"name": "synthetic", "layout": "synthetic", "categories": "all"},
                 {"name": "synthetic", "layout": "synthetic"}):
        assert parse_suite(mini(datasets=[data]), SUITE).datasets[0].categories is None
    assert parse_suite(mini(), SUITE).datasets[0].categories == ("weave", "washer")


# ---- the file: not empty, not huge, no aliases ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_suite_is_an_error_not_the_default_suite(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml: the suite is empty"):
        load_suite(path)


def test_images_per_defect_type_are_bounded_before_any_job_runs():
    assert "generate.n is 1000000000000; at most 10000 images per defect type" in _error(generate={"n": 10**12})
    assert parse_suite(mini(generate={"n": 10_000}), SUITE).n_per_defect == 10_000


def test_yaml_aliases_are_refused(tmp_path):
    """An alias bomb: each level doubles the one before; nine levels here, thirty would be gigabytes expanded."""
    levels = ", ".join(f"&a{i} " + ("[x, x]" if i == 0 else f"[*a{i - 1}, *a{i - 1}]") for i in range(9))
    path = tmp_path / "bomb.yaml"
    path.write_text(MINI.read_text() + f"description: [{levels}]\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml: line \d+: alias \*a0: suites take no YAML aliases"):
        load_suite(path)


def test_a_suite_file_over_one_mib_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(MINI.read_text() + "# " + "x" * 2**20 + "\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: larger than 1 MiB"):
        load_suite(path)


# ---- export and leaderboard: names stay inside results/ ------------------------------------------------------------


def test_export_and_leaderboard_refuse_names_that_leave_their_folders(tmp_path, capsys, monkeypatch):
    from harness.cli import main

    results = tmp_path / "results"
    (tmp_path / "outside").mkdir()  # what `export ../../outside` read as a run and wrote its files into
    monkeypatch.setenv("DEFECTBENCH_RESULTS", str(results))  # restored after the test (cmd_leaderboard sets it)
    for args in (["export", "../../outside"], ["export", "mini/../../outside"], ["leaderboard", "../outside"]):
        assert main([*args, "--results", str(results)]) == 2, args
        assert "cannot name a folder" in capsys.readouterr().err, args
    assert not (results / "exports").exists() and not any((tmp_path / "outside").iterdir())
