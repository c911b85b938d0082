"""Numbers you can trust: random streams, reference sizes and missing values, background and mask metrics,
bad input, file permissions and concurrent writers, GPU declarations. (Faults on disk: tests/test_faults.py;
the published evaluation rules: tests/test_published_metrics.py.)"""
from __future__ import annotations

import math
import multiprocessing
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.cli import main
from harness.data import read_category
from harness.data.splits import make_split
from harness.errors import ConfigError
from harness.data.samples import read_samples
from harness.generation import fit_method, generate_to
from harness.methods import load_method
from harness.runner.suite import parse_suite
from harness.tasks import build_task
from tests.test_runner import MINI, mini



def _generate(root: Path, name: str, category: str, defect: str, out: Path, seed: int = 0, n: int = 4) -> Path:
    method = load_method(name, "tiny")
    task = build_task(make_split(read_category(root, category, dataset="synthetic")), [defect], 64, seed)
    fit_method(method, task, out.with_name(out.name + ".fit"))
    return generate_to(method, task, defect, n, seed, out, out.with_name(out.name + ".fit"), progress=False)


def _masks(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / r["mask"])) > 0 for r in read_samples(folder)]


# ---- random streams ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cutpaste", "draem"])
def test_each_defect_type_and_category_gets_its_own_random_stream(name, synth_root, tmp_path):
    hole = _generate(synth_root, name, "weave", "hole", tmp_path / "hole")
    stain = _generate(synth_root, name, "weave", "stain", tmp_path / "stain")
    grain = _generate(synth_root, name, "grain", "scratch", tmp_path / "grain")
    for other in (stain, grain):
        ious = [(a & b).sum() / max((a | b).sum(), 1) for a, b in zip(_masks(hole), _masks(other))]
        assert max(ious) < 0.9, ious  # same seed, same sample index: different defects
    again = _generate(synth_root, name, "weave", "hole", tmp_path / "again")
    for row in read_samples(hole):  # and a rerun draws exactly the same
        assert (hole / row["image"]).read_bytes() == (again / row["image"]).read_bytes()


# ---- what a value is computed from ---------------------------------------------------------------------------


def test_scores_record_reference_sizes_and_why_a_value_is_missing(synth_root, tmp_path):
    from harness.metrics.iclpips import ICLPIPSConfig
    from harness.metrics.score import ScoreConfig, Scorer, ScoreInputs

    out = _generate(synth_root, "cutpaste", "washer", "crack", tmp_path / "gen", n=12)
    test = sorted((synth_root / "washer" / "test" / "crack").glob("*.png"))
    scorer = Scorer("tiny", ScoreConfig(resolution=64, ic_lpips=ICLPIPSConfig(size=64)))
    values = {v.metric: v for v in scorer.score(ScoreInputs.from_folder(out, test[:3], []))}
    assert values["fid"].n_real == 3 and values["fid"].below_minimum and values["kid"].below_minimum
    assert values["is"].details["splits"] == 10 and values["is"].below_minimum  # 12 images: flagged, not re-split
    for metric in ("ic_lpips", "lpips_to_real"):  # no centres: said, not dropped
        assert values[metric].value is None and "no IC-LPIPS centres" in values[metric].missing
    one = {v.metric: v for v in scorer.score(ScoreInputs.from_folder(out, test[:1], test[:1]))}
    assert one["fid"].value is None and "at least 2" in one["fid"].missing
    assert one["ic_lpips"].n_centres == 1 and one["ic_lpips"].value is not None


def test_split_warns_when_a_protocol_leaves_a_defect_type_without_a_part(tmp_path, capsys):
    root = tmp_path / "one"
    assert main(["synth", str(root), "--size", "48", "--n-train", "2", "--n-defect", "1", "--categories", "pill"]) == 0
    assert main(["split", str(root), "--category", "pill", "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "warning: pill/crack (1 images" in out and "no test images" in out


def test_a_category_mixing_grayscale_and_colour_images_warns_once(synth_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synth_root / "weave", root / "weave")
    for path in sorted((root / "weave" / "test" / "hole").glob("*.png")):
        Image.open(path).convert("L").save(path)  # grayscale defects beside colour normal images
    category = read_category(root, "weave")
    mixed = [w for w in category.warnings if "grayscale" in w]
    assert len(mixed) == 1 and "colour" in mixed[0]


# ---- background fidelity and mask alignment ---------------------------------------------------------------


def test_bg_psnr_is_pooled_so_one_identical_sample_cannot_dominate():
    from harness.metrics.paired import psnr_from_error, squared_error_outside

    rng = np.random.default_rng(0)
    normal = rng.integers(40, 200, (32, 32, 3)).astype(np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[10:20, 10:20] = True
    noisy = [np.clip(normal + rng.normal(0, 4.5, normal.shape), 0, 255).astype(np.uint8) for _ in range(4)]
    samples = [normal.copy()] + noisy  # one identical background, four at ~35 dB
    errors = [squared_error_outside(s, normal, mask) for s in samples]
    per_sample = [psnr_from_error(*e) for e in errors]
    pooled = psnr_from_error(sum(e for e, _ in errors), sum(c for _, c in errors))
    assert per_sample[0] == 100.0 and 33 < np.mean(per_sample[1:]) < 37
    assert np.mean(per_sample) > 45  # the mean of decibels: dominated by the identical one
    assert pooled == pytest.approx(np.mean(per_sample[1:]) + 10 * math.log10(5 / 4), abs=0.3)


def test_mask_iou_sees_a_faint_stain_and_not_a_changed_background():
    from harness.metrics.paired import mask_iou

    normal = np.full((64, 64, 3), 120, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:30, 20:30] = True
    faint = normal.copy()
    faint[mask] += 20  # a +20/255 stain, under a fixed 10 % threshold it would score 0
    assert mask_iou(faint, normal, mask) == 1.0
    shifted = normal.copy()
    shifted[40:50, 40:50] += 80  # a strong change off the mask
    assert mask_iou(shifted, normal, mask) == 0.0
    assert mask_iou(normal, normal, mask) == 0.0  # nothing changed


# ---- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    ({"seeds": ["a"]}, "seeds: 'a' is not an integer"),
    ({"seeds": []}, "'seeds' is empty"),
    ({"seeds": [0, 0]}, "lists a seed twice"),
    ({"metrics": []}, "'metrics' is empty"),
    ({"executor": {"kind": "serial", "max_retries": "x"}}, "executor.max_retries must be an integer"),
    ({"weights": [1, 2]}, "weights must be a mapping"),
    ({"weights": {"vgg": "/x"}}, "unknown network 'vgg'"),
    ({"weights": {"vgg16": 3}}, "weights.vgg16 must be a file or folder path"),
    ({"datasets": [{"name": "s", "layout": "synthetic", "synth": {"size": -48}}]}, "synth: size must be an integer >= 48"),
    ({"datasets": [{"name": "s", "layout": "synthetic", "synth": {"n_train": "eight"}}]}, "n_train must be an integer"),
    ({"name": "../escape"}, "name '../escape' cannot name a folder"),
    ({"name": "a/b"}, "cannot name a folder"),
    ({"datasets": [{"name": "..", "layout": "synthetic"}]}, "datasets[0].name '..' cannot name a folder"),
    ({"methods": [{"method": "cutpaste", "label": "x/../../y"}]}, "methods[0].label"),
])
def test_bad_suite_values_name_the_key(change, message):
    with pytest.raises(ConfigError) as info:
        parse_suite(mini(**change), Path("suites/x.yaml"))
    assert message in str(info.value) and "suites/x.yaml" in str(info.value)


def test_labels_with_spaces_become_safe_file_names():
    from harness.report.leaderboard import file_name

    name = file_name("synthetic", "weave", "bg-aware baseline (Eq. 2, random init)")
    assert "/" not in name and " " not in name and name.endswith(".png")
    assert name != file_name("synthetic", "weave", "bg-aware baseline (Eq. 2; random init)")


@pytest.mark.parametrize("n", ["0", "-1", "1000000000000"])
def test_generate_rejects_a_bad_count_before_any_work(n, synth_root, tmp_path, capsys):
    code = main(["generate", "--method", "draem", "--data", str(synth_root), "--category", "weave", "--defect", "hole",
                 "--n", n, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--n must be a number of images from 1 to 10000" in err and not any(tmp_path.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_results_folder_is_one_line(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o500)
    try:
        code = main(["run", str(MINI), "--results", str(results), "--executor", "serial"])
    finally:
        results.chmod(0o700)
    err = capsys.readouterr().err
    assert code == 2 and err.count("defectbench: error:") == 1 and "Traceback" not in err


def test_os_errors_become_one_line(monkeypatch, capsys):
    """A full disk or a read-only folder anywhere in a command: one line naming the file, exit 2."""
    import errno

    import harness.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/results/runs/x/manifest.json")

    monkeypatch.setattr(cli, "cmd_methods", full)
    assert main(["methods"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("defectbench: error: /results/runs/x/manifest.json: no space left on the device (")
    assert err.endswith(" free); free some space and run again: finished work is kept\n") and err.count("\n") == 1


# ---- files: permissions and concurrent writers -------------------------------------------------------------


def test_written_files_follow_the_umask(tmp_path):
    from harness.io import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def _make_random_inception(cache: str) -> str:
    os.environ["DEFECTBENCH_CACHE"] = cache
    from harness.metrics.fidelity import random_inception_weights

    return str(random_inception_weights(0))


def test_concurrent_writers_of_one_cache_file_do_not_collide(tmp_path):
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.map(_make_random_inception, [str(tmp_path)] * 3)
    assert len(set(paths)) == 1 and Path(paths[0]).is_file()
    assert not list(Path(paths[0]).parent.glob("*.tmp"))


# ---- jobs: devices and GPUs ----------------------------------------------------------------------------------


def test_jobs_ask_for_a_gpu_share_only_where_the_cluster_has_gpus():
    from harness.profiles import get_profile
    from harness.runner.executors import _fits, ray_options
    from harness.runner.kind import Job, job_resources

    def make_job(kind, resources):
        return Job(kind, kind, kind, None, resources=resources)

    job = make_job("score", resources=job_resources(get_profile("tiny")))
    paste = make_job("fit", resources=job_resources(get_profile("tiny"), gpu=False))
    assert ray_options(job, {"CPU": 16, "GPU": 0}, 2)["num_gpus"] == 0
    assert ray_options(job, {"CPU": 16, "GPU": 1}, 2)["num_gpus"] == pytest.approx(0.125)
    assert ray_options(paste, {"CPU": 16, "GPU": 1}, 2)["num_gpus"] == 0
    assert job_resources(get_profile("paper"))["num_gpus"] == 1.0
    running = [job] * 8  # eight tiny jobs fill one GPU
    assert not _fits(job, running, {"CPU": 16, "GPU": 1}) and _fits(job, running[:7], {"CPU": 16, "GPU": 1})
    wide = make_job("backbone", resources=job_resources(get_profile("tiny"), num_cpus=2))
    assert ray_options(wide, {"CPU": 16, "GPU": 0}, 2)["num_cpus"] == 2
    assert ray_options(wide, {"CPU": 1, "GPU": 0}, 2)["num_cpus"] == 1  # capped: it still runs on a 1-CPU cluster
    assert _fits(wide, [], {"CPU": 1, "GPU": 0}) and not _fits(wide, [job], {"CPU": 2, "GPU": 0})


def test_status_records_the_device(tmp_path):
    from dataclasses import dataclass

    from harness.runner.executors import execute_job
    from harness.runner.kind import JobKind
    from harness.runner.kinds import KINDS

    @dataclass(frozen=True)
    class Nothing:
        pass

    class Noop(JobKind):
        name, params_type = "noop", Nothing

        def run(self, params, where, ctx):
            return []

    KINDS.add("noop", Noop())
    try:
        status = execute_job(Noop().job("noop", Nothing()).as_dict(), str(tmp_path / "job"), {}, {})
    finally:
        KINDS.remove("noop")
    assert status["state"] == "done" and (status["device"] == "cpu" or status["device"].startswith("cuda:"))
    assert set(status["outputs"]) == {"records.jsonl"}


def test_pretraining_runs_on_the_harness_device(monkeypatch):
    """The tiny backbone's networks are moved to harness.device (the GPU where there is one)."""
    import torch

    from harness.diffusion import pretrain
    from harness.diffusion.backbone import Backbone

    moved = []
    original = Backbone.to
    marked = torch.device("cpu", 0)  # a device object only harness.device returns here
    monkeypatch.setattr(Backbone, "to", lambda self, device: moved.append(torch.device(device)) or original(self, device))
    monkeypatch.setattr(pretrain, "default_device", lambda: marked)
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3)).astype(np.uint8)
    pretrain.pretrain(images, ["weave", "weave"], pretrain.PretrainConfig(resolution=32, vae_steps=1, unet_steps=1,
                                                                          batch_size=2, vae_crop=0))
    assert moved == [marked, torch.device("cpu")]  # to harness.device, then back to the CPU to be saved


def test_a_detector_with_non_finite_scores_fails_with_its_name(monkeypatch, tmp_path, isolated_cache):
    import harness.downstream.detectors as detectors
    from harness.runner.kind import JobContext
    from harness.runner.kinds import KINDS
    from harness.runner.plan import expand, prepare

    suite = parse_suite(mini(detectors=["padim"], methods=["cutpaste"]), MINI)
    job = next(j for j in expand(prepare(suite)) if j.kind == "detect")
    monkeypatch.setattr(detectors, "run", lambda model, normal, test, *a, **k: (
        np.full(test.masks.shape, np.nan), np.zeros(len(test)), None))
    with pytest.raises(ValueError, match="padim produced non-finite anomaly scores"):
        KINDS["detect"].run(job.params, job.where, JobContext(tmp_path, {}, {}))


def test_the_leaderboard_says_once_that_a_category_mixes_grayscale_and_colour(synth_root, tmp_path, isolated_cache):
    import shutil

    import yaml

    from harness.report.leaderboard import render_leaderboard
    from harness.runner.run import run_suite

    root = tmp_path / "data"
    shutil.copytree(synth_root / "washer", root / "washer")
    for path in sorted((root / "washer" / "test").glob("*/*.png")):
        Image.open(path).convert("L").save(path)
    raw = yaml.safe_load(MINI.read_text())
    raw.update(name="gray", methods=["cutpaste"], metrics=["bg_psnr"],
               datasets=[{"name": "disk", "layout": "mvtec_ad", "root": str(root)}])
    with pytest.warns(UserWarning, match="grayscale"):
        run_suite(parse_suite(raw, tmp_path / "gray.yaml"), executor="serial", results=tmp_path / "r", progress=False)
    md, _ = render_leaderboard("gray", tmp_path / "r")
    assert md.read_text().count("grayscale") == 1


def test_a_job_stopped_at_its_time_limit_keeps_the_drivers_status_when_its_worker_writes_late(tmp_path):
    """Ray's forced cancel raises SystemExit in the job, whose status can then land after the driver's timeout."""
    from harness.runner.store import read_status, write_status

    write_status(tmp_path, {"state": "failed", "error": "TimeoutError: ran past its time limit"})
    assert not write_status(tmp_path, {"state": "failed", "error": "SystemExit: 1"}, replace=False)
    assert read_status(tmp_path)["error"].startswith("TimeoutError")
    assert not list(tmp_path.glob("*.tmp"))
    assert write_status(tmp_path / "fresh", {"state": "done"}, replace=False)
    assert read_status(tmp_path / "fresh")["state"] == "done"
