"""The runner: suite validation, job graph, serial and Ray execution, resume, failure isolation, leaderboards.
(Killed runs, damaged results and concurrent runs: tests/test_faults.py.)"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.errors import ConfigError
from harness.results import load, run_records
from harness.runner.plan import expand, prepare
from harness.runner.run import run_suite
from harness.runner.suite import load_suite, parse_suite

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "tests" / "suites" / "mini.yaml"
CLI = [sys.executable, "-m", "harness.cli"]
VALUE_FIELDS = ["dataset", "category", "defect_type", "method", "fold", "seed", "metric", "value", "n", "job_key"]


def mini(**changes) -> dict:
    import yaml

    raw = yaml.safe_load(MINI.read_text())
    raw.update(changes)
    return raw


# ---- suites -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    ({"methdos": ["cutpaste"]}, "unknown key 'methdos' (did you mean 'methods'?)"),
    ({"methods": ["cutpast"]}, "unknown method 'cutpast' (did you mean 'cutpaste'?)"),
    ({"methods": [{"method": "croppaste", "config": {"blendd": 1}}]}, "unknown key 'blendd'"),
    ({"metrics": ["fid", "lpips"]}, "metrics: unknown value 'lpips'"),
    ({"protocol": "thirds"}, "protocol: unknown value 'thirds'"),
    ({"generate": {"n": 0}}, "generate.n must be a positive integer"),
    ({"datasets": [{"name": "x", "layout": "mvtec_ad", "root": "/no/such/folder"}]}, "datasets[0].root: /no/such/folder does not exist"),
    ({"datasets": [{"name": "x", "layout": "mvtec_ad", "root": "${DATA}"}]}, "give the data root with DATA=/path"),
    ({"datasets": [{"name": "x", "layout": "synthetic", "synth": {"sise": 3}}]}, "unknown key 'datasets[0].synth.sise'"),
])
def test_bad_suites_name_the_key_and_the_file(change, message, monkeypatch):
    monkeypatch.delenv("DATA", raising=False)
    with pytest.raises(ConfigError) as info:
        parse_suite(mini(**change), Path("suites/x.yaml"))
    assert message in str(info.value) and "suites/x.yaml" in str(info.value)


def test_data_root_from_argument(tmp_path):
    suite = parse_suite(mini(datasets=[{"name": "x", "layout": "mvtec_ad", "root": "${DATA}"}]), None, data=tmp_path)
    assert suite.datasets[0].root == tmp_path


def test_shipped_suites_are_valid(tmp_path):
    for name in ("smoke", "mvtec-ad", "mvtec-loco", "mvtec-caption"):
        suite = load_suite(name, data=tmp_path)
        assert suite.methods and suite.metrics
    assert load_suite("mvtec-ad", data=tmp_path).profile.name == "paper"
    assert {m.method for m in load_suite("smoke").methods} >= {"cutpaste", "croppaste", "draem"}


def test_the_demo_is_the_smoke_suite_on_one_of_its_categories():
    """`make demo` runs suites/demo.yaml: every setting as suites/smoke.yaml (kept in step) but, for its budget, one
    category and four of the six detectors; both use the shipped tiny backbone as it is."""
    import yaml

    from harness.downstream.config import detector_names
    from harness.runner.suite import SUITES_DIR

    demo, smoke = (yaml.safe_load((SUITES_DIR / f"{name}.yaml").read_text()) for name in ("demo", "smoke"))
    (demo_data,), (smoke_data,) = demo.pop("datasets"), smoke.pop("datasets")
    assert "pretrain_categories" not in demo_data and "pretrain_categories" not in smoke_data
    assert len(demo_data.pop("categories")) == 1 and set(load_suite("demo").datasets[0].categories) < set(
        smoke_data.pop("categories"))
    assert smoke.pop("detectors") == "all" and 0 < len(demo.pop("detectors")) < len(detector_names())
    assert "backbone" not in demo and "backbone" not in smoke
    demo.pop("description"), smoke.pop("description")
    assert demo == smoke and demo_data == smoke_data


def test_job_graph(isolated_cache):
    plan = prepare(load_suite(MINI))
    jobs = expand(plan)
    kinds = [j.kind for j in jobs]
    assert kinds.count("fit") == 18 and kinds.count("generate") == 18 and kinds.count("score") == 18
    by_key = {j.key: j for j in jobs}
    seen = set()
    for job in jobs:  # dependency order
        assert all(d in seen for d in job.deps)
        seen.add(job.key)
    score = next(j for j in jobs if j.kind == "score")
    assert by_key[score.deps[0]].kind == "generate"
    assert len({j.key for j in jobs}) == len(jobs)
    again = expand(prepare(load_suite(MINI)))
    assert [j.key for j in again] == [j.key for j in jobs]  # keys are stable


# ---- running ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory, isolated_cache):
    results = tmp_path_factory.mktemp("serial")
    result = run_suite(load_suite(MINI), executor="serial", results=results, progress=False)
    return results, result


def test_per_image_rows_give_the_scores_records(serial_run):
    """Exported per generated image, the scores' values come back: LPIPS-real the mean of the LPIPS to the nearest
    centre, Mask-IoU the mean, BG-PSNR pooled from the rows' squared errors and counts."""
    import math

    import pandas as pd

    from harness.metrics.paired import psnr_from_error
    from harness.results import export_per_image, load_per_image

    results, result = serial_run
    rows = load_per_image("mini", results=results)
    records = run_records(result.store).set_index(["job_key", "metric"])["value"]
    scored = rows[rows["kind"] == "score"]
    assert scored["job_key"].nunique() == 18 and len(scored) == 18 * 3 and not rows.attrs["without_rows"]
    for key, job in scored.groupby("job_key"):
        assert job["lpips_to_centre"].mean() == pytest.approx(records[(key, "lpips_to_real")])
        assert job["mask_iou"].mean() == pytest.approx(records[(key, "mask_iou")])
        pooled = psnr_from_error(job["bg_squared_error"].sum(), job["bg_count"].sum())
        assert pooled == pytest.approx(records[(key, "bg_psnr")])
        assert all(Path(f).is_file() for f in job["file"]) and job["nearest_centre"].notna().all()
    assert not math.isnan(scored["bg_psnr"].iloc[0])
    summary, out, without = export_per_image("mini", results=results)
    assert summary == [{"kind": "score", "jobs": 18, "rows": 54}] and not without
    first = sorted(out.glob("score_*.csv"))[0]
    table, lines = pd.read_csv(first), pd.read_json(first.with_suffix(".jsonl"), lines=True)
    assert table.shape == lines.shape == (3, len(table.columns))
    assert np.allclose(table["lpips_to_centre"], lines["lpips_to_centre"])


def test_serial_run_completes_and_records(serial_run):
    results, result = serial_run
    assert not result.failed and len(result.states) == 54
    frame = run_records(result.store)
    assert set(frame["metric"]) == {"fid", "kid", "lpips_to_real", "ic_lpips", "bg_psnr", "mask_iou"}
    for field in ("suite", "run_id", "profile", "split_hash", "protocol", "code_version", "config_hash", "random_weights",
                  "details", "started", "finished", "job_key"):
        assert field in frame.columns, field
    assert len(load(results=results)) == len(frame)


def test_rerun_skips_finished_jobs(serial_run):
    results, result = serial_run
    before = {p: p.read_text() for p in result.store.run_dir.glob("jobs/*/status.json")}
    again = run_suite(load_suite(MINI), executor="serial", results=results, progress=False)
    assert not again.failed
    after = {p: p.read_text() for p in again.store.run_dir.glob("jobs/*/status.json")}
    assert before == after  # nothing was recomputed


def test_config_change_recomputes_only_what_it_affects(serial_run, tmp_path):
    results, result = serial_run
    path = tmp_path / "mini.yaml"
    raw = mini(methods=["cutpaste", "croppaste", {"method": "draem", "config": {"beta": [0.2, 0.5]}}])
    path.write_text(json.dumps({**raw, "name": "mini"}))
    changed = run_suite(load_suite(path), executor="serial", results=results, progress=False)
    assert changed.store.run_id != result.store.run_id
    executed = list(changed.store.run_dir.glob("jobs/*/status.json"))
    labels = {json.loads(p.read_text())["label"].split()[1] for p in executed}
    assert labels == {"draem"} and len(executed) == 18  # draem's 6 fit + 6 generate + 6 score, nothing else
    assert len(run_records(changed.store)) == len(run_records(result.store))


def test_ray_gives_the_same_records_as_serial(serial_run, tmp_path):
    _, serial = serial_run
    ray_result = run_suite(load_suite(MINI), executor="ray", num_cpus=2, results=tmp_path, progress=False)
    assert not ray_result.failed
    a = run_records(serial.store)[VALUE_FIELDS].sort_values(["job_key", "metric"]).reset_index(drop=True)
    b = run_records(ray_result.store)[VALUE_FIELDS].sort_values(["job_key", "metric"]).reset_index(drop=True)
    assert a.equals(b)


FAILING_METHOD = '''
from harness import Method

class Exploding(Method):
    name = "exploding"
    needs = frozenset({"target_normal"})

    def generate(self, request, workdir):
        raise RuntimeError("this method always fails")
        yield
'''


def _add_method(tmp_path: Path, monkeypatch, name: str, source: str) -> None:
    """A method directory written under tmp_path/methods, found through DEFECTBENCH_METHODS_PATH."""
    folder = tmp_path / "methods" / name
    folder.mkdir(parents=True)
    (folder / "method.py").write_text(source)
    (folder / "method.yaml").write_text("defaults: {}\n")
    monkeypatch.setenv("DEFECTBENCH_METHODS_PATH", str(tmp_path / "methods"))


def test_a_failing_method_is_isolated(tmp_path, monkeypatch, isolated_cache):
    _add_method(tmp_path, monkeypatch, "exploding", FAILING_METHOD)
    suite_path = tmp_path / "failing.yaml"
    suite_path.write_text(json.dumps(mini(methods=["cutpaste", "exploding"], name="failing")))
    result = run_suite(load_suite(suite_path), executor="serial", results=tmp_path / "results", progress=False)
    failed = [k for k, s in result.states.items() if s == "failed"]
    skipped = [k for k, s in result.states.items() if s == "skipped"]
    assert len(failed) == 6 and len(skipped) == 6  # 6 generate jobs fail, their score jobs are skipped
    status = json.loads((result.store.job_dir(failed[0]) / "status.json").read_text())
    assert "this method always fails" in status["traceback"]
    assert set(run_records(result.store)["method"]) == {"cutpaste"}
    from harness.report.leaderboard import render_leaderboard

    md, tex = render_leaderboard("failing", tmp_path / "results")
    text = md.read_text()
    assert "—<sup>f</sup>" in text and "status.json" in text and "cutpaste" in text
    code = subprocess.run(CLI + ["run", str(suite_path), "--results", str(tmp_path / "results"), "--executor", "serial"],
                          capture_output=True, text=True, env={**os.environ}).returncode
    assert code == 1


STAND_IN_METHOD = '''
from harness import GeneratedSample, Method

class HalfStandIn(Method):
    """Copies the normal image and darkens the target mask; every other sample's mask "comes from a stand-in"."""
    name = "half_stand_in"
    needs = frozenset({"target_normal", "target_mask"})

    def fit(self, task, workdir):
        pass

    def generate(self, request, workdir):
        for index, target in enumerate(request.targets):
            image = target.normal.image.copy()
            image[target.mask] //= 2
            yield GeneratedSample.on_target(target, image, target.mask, request.defect_type) if index % 2 else \\
                GeneratedSample(image=image, mask=target.mask, defect_type=request.defect_type,
                                normal_id=target.normal.id, stand_in="mask: a test's stand-in")
'''


def test_values_from_stand_in_samples_say_so_in_records_and_leaderboard(tmp_path, monkeypatch, isolated_cache):
    _add_method(tmp_path, monkeypatch, "half_stand_in", STAND_IN_METHOD)
    suite_path = tmp_path / "standin.yaml"
    suite_path.write_text(json.dumps(mini(methods=["cutpaste", "half_stand_in"], name="standin",
                                          metrics=["fid", "bg_psnr"])))
    result = run_suite(load_suite(suite_path), executor="serial", results=tmp_path / "results", progress=False)
    assert not result.failed
    records = run_records(result.store)
    ours = records[records["method"] == "half_stand_in"]
    assert set(ours["stand_in"]) == {"2 of 3 samples: mask: a test's stand-in"}
    assert records[records["method"] == "cutpaste"]["stand_in"].isna().all()
    from harness.report.leaderboard import render_leaderboard

    md, _ = render_leaderboard("standin", tmp_path / "results")
    text = md.read_text()
    assert "<sup>‡</sup>" in text and "2 of 3 samples: mask: a test's stand-in" in text


# ---- leaderboards -----------------------------------------------------------------------------------------


def test_leaderboard_markdown_and_latex(serial_run):
    from harness.report.leaderboard import render_leaderboard

    results, _ = serial_run
    md, tex = render_leaderboard("mini", results)
    text = md.read_text()
    assert "| **Average** |" in text and "IC-LPIPS↑" in text and "FID↓" in text
    assert "**" in text and "<u>" in text  # best bold, second underlined
    assert "random-weight" in text and "clean-thirds" in text
    for image in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert (md.parent / image).is_file()
    latex = tex.read_text()
    assert latex.count(r"\toprule") == latex.count(r"\bottomrule") == latex.count(r"\midrule") // 2 >= 3
    assert latex.count("{") == latex.count("}")
    for table in latex.split(r"\begin{tabular}")[1:]:
        rows = [line for line in table.split(r"\end{tabular}")[0].splitlines() if line.endswith("\\\\")]
        header = next(line for line in rows if line.startswith("Category"))
        assert all(line.count("&") == header.count("&") for line in rows if "multicolumn" not in line)
    if shutil.which("pdflatex"):
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name], cwd=tex.parent,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-2000:]


# ---- a two-node Ray cluster on this machine -----------------------------------------------------------------


@pytest.mark.slow
def test_two_node_cluster_by_address(tmp_path, isolated_cache):
    from tests.ray_nodes import ray_nodes

    with ray_nodes(count=2, env={"DEFECTBENCH_CACHE": str(isolated_cache)}) as nodes:
        result = run_suite(load_suite(MINI), executor="ray", address=nodes.address, results=tmp_path, progress=False)
    assert not result.failed
    ran_on = {json.loads(p.read_text())["node"] for p in result.store.run_dir.glob("jobs/*/status.json")}
    assert len(ran_on) == 2  # jobs ran on both nodes


def test_a_ray_started_before_the_tests_is_alive_after_them(bystander_ray):
    """Runs last (conftest.py): no test may stop a Ray it did not start (`ray stop` stops them all)."""
    from tests.ray_nodes import alive

    assert alive(bystander_ray)


def test_reported_numbers_beside_measured(serial_run, tmp_path):
    import yaml

    from harness.report.leaderboard import render_leaderboard

    results, _ = serial_run
    reported = tmp_path / "reported"
    reported.mkdir()
    (reported / "paper.yaml").write_text(yaml.safe_dump({
        "source": {"paper": "A paper", "table": "Table 9"}, "dataset": "synthetic", "protocol": "clean-thirds",
        "scale": {"kid": 1000}, "values": {"cutpaste": {"weave": {"fid": 1.5, "kid": 2.0}}}}))
    md, _ = render_leaderboard("mini", results, out_dir=tmp_path / "board", reported_dir=reported)
    text = md.read_text()
    assert "cutpaste (reported) FID↓" in text and "A paper, Table 9" in text
    assert "1.50" in text
    assert "0.0020" in text  # 2.0 / 1000


def test_announcements_of_running_jobs_reach_the_driver_once(tmp_path):
    """A job's JobContext.announce line (the pretraining's time estimate) is kept in its folder, and the Ray driver
    prints each line once while the job runs (workers' own output does not reach its console)."""
    from harness.runner import executors
    from harness.runner.kind import Job, JobContext

    job = Job("backbone", "k", "backbone tiny synthetic", None)
    context = JobContext(tmp_path, {}, {})
    context.announce("pretraining the tiny backbone: about 4.0 min")

    class Notes:
        lines: list[str] = []

        def note(self, line):
            self.lines.append(line)

    notes, printed = Notes(), {}
    executors._relay_announcements(job, tmp_path, notes, printed)
    executors._relay_announcements(job, tmp_path, notes, printed)  # nothing new: nothing printed again
    context.announce("resumed")
    executors._relay_announcements(job, tmp_path, notes, printed)
    assert notes.lines == ["backbone tiny synthetic: pretraining the tiny backbone: about 4.0 min",
                           "backbone tiny synthetic: resumed"]


def test_jobs_start_in_critical_path_order(tmp_path):
    """The scheduler hands out the heads of the longest chains first: the backbone before a detector."""
    from harness.runner.executors import Scheduler, chain_heights
    from harness.runner.kind import Job

    detect = Job("detect", "d", "detect", None)
    backbone = Job("backbone", "b", "backbone", None)
    fit = Job("fit", "f", "fit", None, (backbone.key,))
    generate = Job("generate", "g", "generate", None, (fit.key,))
    jobs = [detect, generate, fit, backbone]
    heights = chain_heights(jobs)
    assert heights[backbone.key] == 10 + 2 + 1 and heights[detect.key] == 3
    order = [j.label for j in Scheduler(jobs, {}, lambda key: tmp_path / key).pending()]
    assert order == ["backbone", "detect", "fit", "generate"]  # equal heights keep the plan order


def test_loco_categories_get_logical_and_structural_generation_tables(tmp_path, isolated_cache):
    """MVTec LOCO's logical and structural anomalies are separate defect types and get separate generation tables
    (AnomalyXFusion Table 2), each holding only its own defect type's records."""
    import yaml

    from harness.report.leaderboard import render_leaderboard

    raw = mini(datasets=[{"name": "synthetic", "layout": "synthetic", "categories": ["tray"],
                          "synth": {"seed": 0, "size": 48, "n_train": 8, "n_validation": 2, "n_test_good": 2,
                                    "n_defect": 4}}], methods=["cutpaste"], metrics=["fid", "mask_iou"])
    path = tmp_path / "loco.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_suite(load_suite(path), executor="serial", results=tmp_path, progress=False)
    text = render_leaderboard("loco", tmp_path)[0].read_text()
    records = load("loco", results=tmp_path)
    values = {}
    for kind in ("logical", "structural"):
        section = text.split(f"### Closeness to the real defects: FID, KID and LPIPS to the nearest training defect "
                             f"({kind} anomalies)")[1].split("###")[0]
        value = records.loc[(records["metric"] == "fid") & (records["defect_type"] == f"{kind}_anomalies"),
                            "value"].mean()
        values[kind] = f"{value:.2f}"
        assert values[kind] in section.split("| tray |")[1].split("\n")[0], (values, section)
    assert values["logical"] != values["structural"]  # each table its own defect type's
    assert "<sup>1/2" not in text  # a scope's cells are complete with its own defect type's jobs
