"""Fault injection: damage a finished run in every way a disk, a user or a method can, then check that the next
`run` gives a leaderboard byte-identical to an undisturbed run's, or that the command stops with a one-line error
naming what is wrong; never a silently different number.

Each fault is injected into a copy of one undisturbed run (results folder copied with its timestamps)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.errors import DefectBenchError
from harness.report.leaderboard import render_leaderboard
from harness.runner.run import run_suite
from harness.runner.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "suites" / "faults.yaml"
CLI = [sys.executable, "-m", "harness.cli"]
N_JOBS = 18  # 2 methods x 3 defect types x (fit, generate, score)


def board(results: Path) -> tuple[str, str]:
    md, tex = render_leaderboard("faults", results)
    return md.read_text(), tex.read_text()


def run(results: Path, suite: Path = FAULTS, **kwargs):
    return run_suite(load_suite(suite), executor="serial", results=results, progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, isolated_cache):
    results = tmp_path_factory.mktemp("reference")
    result = run(results)
    assert not result.failed and len(result.states) == N_JOBS
    return results, board(results), result


@pytest.fixture
def copy(reference, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(reference[0], results)
    return results


def _job(results: Path, kind: str, defect: str = "crack", method: str = "cutpaste") -> Path:
    for status in results.glob("runs/faults/*/jobs/*/status.json"):
        data = json.loads(status.read_text())
        if data["kind"] == kind and f" {method} " in data["label"] and f"/{defect} " in data["label"]:
            return status.parent
    raise AssertionError(f"no {kind} job for {method}/{defect}")


def _statuses(results: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in results.glob("runs/faults/*/jobs/*/status.json")}


def _assert_redone_and_identical(results: Path, reference, redone: set[str]) -> None:
    before = _statuses(results)
    again = run(results)
    assert not again.failed
    after = _statuses(results)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == redone, (changed, redone)
    assert board(results) == reference[1]


# ---- damaged records, statuses, manifests, samples --------------------------------------------------------


@pytest.mark.parametrize("damage", ["line boundary", "mid-line", "deleted"])
def test_damaged_records_are_named_then_redone(reference, copy, damage):
    folder = _job(copy, "score")
    records = folder / "records.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    if damage == "line boundary":
        records.write_text("".join(lines[:-1]))
    elif damage == "mid-line":
        records.write_text("".join(lines)[: len("".join(lines)) - 25])
    else:
        records.unlink()
    with pytest.raises(DefectBenchError) as info:
        board(copy)
    assert str(records) in str(info.value) and "\n" not in str(info.value)
    _assert_redone_and_identical(copy, reference, {folder.name})


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_damaged_status_is_named_then_redone(reference, copy, damage):
    folder = _job(copy, "score", "chip")
    status = folder / "status.json"
    if damage == "truncated":
        status.write_text(status.read_text()[:40])
    else:
        status.unlink()
    with pytest.raises(DefectBenchError) as info:
        board(copy)
    assert str(status) in str(info.value)
    _assert_redone_and_identical(copy, reference, {folder.name})


def test_a_deleted_sample_redoes_its_generate_job_and_what_needs_it(reference, copy):
    generate = _job(copy, "generate", "stain", "draem")
    (generate / "samples" / "images" / "0001.png").unlink()
    with pytest.raises(DefectBenchError, match="0001.png"):
        board(copy)
    score = _job(copy, "score", "stain", "draem")
    _assert_redone_and_identical(copy, reference, {generate.name, score.name})


def _same_size_and_mtime(path: Path, edit) -> None:
    """Change a file's content in place, keeping its size and modification time (a bit flip, an edited digit)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_a_bit_flipped_sample_with_its_size_and_time_is_found_and_redone(reference, copy):
    generate = _job(copy, "generate", "stain", "draem")
    sample = generate / "samples" / "images" / "0001.png"

    def flip(data: bytearray) -> None:
        data[len(data) // 2] ^= 0x10

    _same_size_and_mtime(sample, flip)
    with pytest.raises(DefectBenchError, match="0001.png: content differs"):
        board(copy)
    score = _job(copy, "score", "stain", "draem")
    _assert_redone_and_identical(copy, reference, {generate.name, score.name})


def test_an_edited_digit_in_per_image_values_is_not_exported(reference, copy):
    from harness.results import export_per_image
    from harness.runner.store import PER_IMAGE_FILE

    per_image = _job(copy, "score", "crack") / PER_IMAGE_FILE

    def edit(data: bytearray) -> None:
        at = data.index(b'"bg_count": ') + len(b'"bg_count": ')
        data[at] = ord("1") if data[at] != ord("1") else ord("2")

    _same_size_and_mtime(per_image, edit)
    with pytest.raises(DefectBenchError, match=f"{PER_IMAGE_FILE}: content differs"):
        export_per_image("faults", results=copy, out=copy.parent / "export")
    assert not (copy.parent / "export").exists()


def test_a_damaged_inception_feature_cache_is_named_and_rebuilt(reference, copy, isolated_cache):
    """Truncated entries of the feature cache: the score jobs redone warn naming each and compute the features
    again, with the same numbers."""
    entries = sorted((isolated_cache / "inception").glob("*.pt"))
    assert entries
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:100])
    scores = [p.parent.name for p in copy.glob("runs/faults/*/jobs/*/status.json")
              if json.loads(p.read_text())["kind"] == "score"]
    for key in scores:
        shutil.rmtree(next(copy.glob(f"runs/faults/*/jobs/{key}")))
    again = run(copy)
    assert not again.failed
    named = [w for key in scores for w in json.loads((again.store.job_dir(key) / "status.json").read_text())["warnings"]
             if "damaged Inception feature cache entry" in w]
    assert named and all(re.search(r"inception/[0-9a-f]+\.pt: damaged", w) for w in named)
    assert board(copy) == reference[1]


def test_a_truncated_manifest_is_named_then_rewritten(reference, copy):
    manifest = next(copy.glob("runs/faults/*/manifest.json"))
    manifest.write_text(manifest.read_text()[:100])
    with pytest.raises(DefectBenchError) as info:
        board(copy)
    assert str(manifest) in str(info.value)
    with pytest.warns(UserWarning, match="manifest.json"):
        _assert_redone_and_identical(copy, reference, set())


def test_a_deleted_manifest_is_named_not_replaced_by_an_older_run(reference, copy):
    import yaml

    raw = yaml.safe_load(FAULTS.read_text())
    other = copy.parent / "other.yaml"
    other.write_text(json.dumps({**raw, "name": "faults", "metrics": ["fid", "kid"]}))  # an older run of the suite
    older = run(copy, other)
    os.utime(older.store.manifest_path, (0, 0))
    latest = next(p for p in copy.glob("runs/faults/*/manifest.json") if p.parent != older.store.run_dir)
    latest.unlink()
    with pytest.raises(DefectBenchError) as info:
        board(copy)
    assert str(latest) in str(info.value)
    run(copy)  # rewrites it; nothing else to do
    assert board(copy) == reference[1]


def test_a_job_is_redone_when_a_job_it_needs_was_redone_with_other_outputs(reference, copy):
    """A generate job redone in an earlier, stopped invocation (new samples, pinned anew): its score job, intact on
    disk, was computed from the old samples and must be redone."""
    from harness.runner.store import pin_outputs, read_status, write_status

    generate = _job(copy, "generate", "chip", "draem")
    image = generate / "samples" / "images" / "0000.png"
    pixels = np.asarray(Image.open(image)).copy()
    pixels[:4, :4] = 255 - pixels[:4, :4]
    Image.fromarray(pixels).save(image)
    write_status(generate, {**read_status(generate), "outputs": pin_outputs(generate)})
    score = _job(copy, "score", "chip", "draem")
    before = _statuses(copy)
    again = run(copy)
    assert not again.failed
    changed = {k for k, v in _statuses(copy).items() if v != before.get(k)}
    assert changed == {score.name}


def test_the_cli_prints_one_line(reference, copy):
    (_job(copy, "score") / "records.jsonl").write_text("")
    done = subprocess.run(CLI + ["leaderboard", "faults", "--results", str(copy)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("defectbench: error:") and done.stderr.count("\n") == 1 and "records.jsonl" in done.stderr


# ---- failing methods ----------------------------------------------------------------------------------------

FLAKY = '''
import sys
from harness import Method, GeneratedSample

class Flaky(Method):
    name = "{name}"
    needs = frozenset({{"target_normal"}})

    def generate(self, request, workdir):
        if request.defect_type == "crack":
            {failure}
        for target in request.targets:
            yield GeneratedSample.on_target(target, target.normal.image, target.mask if target.mask is not None
                                            else target.normal_foreground, request.defect_type)
'''


def _plugin(tmp_path, monkeypatch, name: str, failure: str, **suite_changes) -> Path:
    folder = tmp_path / "plugins" / name
    folder.mkdir(parents=True)
    (folder / "method.py").write_text(FLAKY.format(name=name, failure=failure))
    (folder / "method.yaml").write_text("defaults: {}\n")
    monkeypatch.setenv("DEFECTBENCH_METHODS_PATH", str(tmp_path / "plugins"))
    suite = tmp_path / f"{name}.yaml"
    import yaml

    raw = yaml.safe_load(FAULTS.read_text())
    suite.write_text(json.dumps({**raw, "name": "faults", "methods": ["cutpaste", name], **suite_changes}))
    return suite


@pytest.mark.parametrize("failure, through_the_cli", [('raise RuntimeError("no cracks here")', False),
                                                      ("sys.exit(3)", True), ("import os; os._exit(5)", False)])
def test_a_method_failing_on_one_defect_type_marks_its_cells(tmp_path, monkeypatch, isolated_cache, failure,
                                                             through_the_cli):
    suite = _plugin(tmp_path, monkeypatch, "flaky", failure)
    result = run(tmp_path / "results", suite)  # sys.exit or os._exit in the serial executor must not end the run
    states = list(result.states.values())
    assert states.count("failed") == 1 and states.count("skipped") == 1 and states.count("done") == N_JOBS - 2
    if "os._exit" in failure:
        (failed,) = [k for k, state in result.states.items() if state == "failed"]
        error = json.loads((result.store.job_dir(failed) / "status.json").read_text())["error"]
        assert error.startswith("WorkerDied: the job's process ended before the job finished (exit code 5")
    md, _ = board(tmp_path / "results")
    flaky_cells = []
    for table in md.split("\n\n"):
        lines = [line for line in table.splitlines() if line.startswith("| ")]
        if not lines or not lines[0].startswith("| Category |"):
            continue
        header = [c.strip() for c in lines[0].split("|")[1:-1]]
        columns = [i for i, name in enumerate(header) if name.startswith("flaky ")]
        for line in lines[1:]:
            cells = [c.strip() for c in line.split("|")[1:-1]]
            flaky_cells += [cells[i] for i in columns]
    assert len(flaky_cells) == 8  # 4 metrics x (washer, Average)
    assert all("<sup>f 2/3" in c and "**" not in c and "<u>" not in c for c in flaky_cells), flaky_cells
    assert "the jobs of the others failed" in md
    if not through_the_cli:
        return
    done = subprocess.run(CLI + ["run", str(suite), "--results", str(tmp_path / "results2"), "--executor", "serial"],
                          capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 1 and "FAILED" in done.stdout


def test_a_worker_crash_under_ray_is_recorded_and_marked(tmp_path, monkeypatch, isolated_cache):
    """A method that kills its worker process (os._exit) on one defect type: Ray reports the task lost, the job is
    recorded as failed, and its cells say so."""
    suite = _plugin(tmp_path, monkeypatch, "crashing", "import os; os._exit(1)",
                    executor={"kind": "ray", "num_cpus": 2, "max_retries": 0})
    result = run_suite(load_suite(suite), results=tmp_path / "results", progress=False)
    failed = [k for k, state in result.states.items() if state == "failed"]
    assert len(failed) == 1 and list(result.states.values()).count("skipped") == 1
    status = json.loads((result.store.job_dir(failed[0]) / "status.json").read_text())
    assert "generate crashing" in status["label"] and status["state"] == "failed"
    md, _ = board(tmp_path / "results")
    assert md.count("<sup>f 2/3") == 8  # the crashing method's 4 metrics, per category and Average


@pytest.mark.parametrize("kind", ["serial", "ray"])
def test_a_hanging_method_is_stopped_at_its_time_limit_and_the_run_goes_on(tmp_path, monkeypatch, isolated_cache,
                                                                          kind):
    suite = _plugin(tmp_path, monkeypatch, "hanging", "import time; time.sleep(3600)",
                    executor={"kind": kind, "num_cpus": 2, "max_retries": 0, "timeouts": {"generate": 8}})
    begin = time.monotonic()
    result = run_suite(load_suite(suite), results=tmp_path / "results", progress=False)
    assert time.monotonic() - begin < 240
    failed = [k for k, state in result.states.items() if state == "failed"]
    assert len(failed) == 1 and list(result.states.values()).count("skipped") == 1
    status = json.loads((result.store.job_dir(failed[0]) / "status.json").read_text())
    assert "generate hanging" in status["label"]
    assert status["error"].startswith("TimeoutError: ran past its time limit of 8 s and was stopped "
                                      "(executor.timeouts.generate in the suite; default 86400 s)")
    assert board(tmp_path / "results")[0].count("<sup>f 2/3") == 8


def _alive(pid: int, started: float) -> bool:
    """Whether the process that had this pid and start time still runs (not a zombie, not a reused pid)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_killed_ray_drivers_leftover_processes_are_ended_by_the_next_run(tmp_path, monkeypatch, isolated_cache):
    """SIGKILL of the driver (only) leaves Ray's agents running, re-parented to init; the next run of the same
    results folder ends them (each checked by its start time, so that a reused pid is left alone)."""
    from harness.runner.store import end_leftovers

    suite = _plugin(tmp_path, monkeypatch, "hanging", "import time; time.sleep(3600)",
                    executor={"kind": "ray", "num_cpus": 2, "max_retries": 0})
    results = tmp_path / "results"
    driver = subprocess.Popen(CLI + ["run", str(suite), "--results", str(results)], env={**os.environ},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    noted = None
    try:
        deadline = time.time() + 240
        while _done_count(results) < N_JOBS - 2 and time.time() < deadline:
            time.sleep(0.5)
        assert _done_count(results) == N_JOBS - 2  # all but the hanging job and its score
        time.sleep(6)  # the list of Ray's processes is brought up to date every 5 s
        noted = next(results.glob("runs/faults/.*.processes.json"))
        recorded = json.loads(noted.read_text())["processes"]
        driver.kill()
        driver.wait()
        time.sleep(3)
        left = [pid for pid, started in recorded if _alive(pid, started)]
        assert left  # Ray's agents, at least: what the next run must end
        edited = json.loads(suite.read_text())
        edited["executor"] = {"kind": "serial", "timeouts": {"generate": 5}}
        suite.write_text(json.dumps(edited))
        again = run_suite(load_suite(suite), results=results, progress=False)
        assert list(again.states.values()).count("done") == N_JOBS - 2
        assert not [pid for pid, started in recorded if _alive(pid, started)]
        assert not noted.exists()
    finally:
        driver.kill()
        if noted is not None:
            end_leftovers(noted)


# ---- concurrency, kill -9 -----------------------------------------------------------------------------------


def _done_count(results: Path) -> int:
    return sum('"state": "done"' in p.read_text() for p in results.glob("runs/faults/*/jobs/*/status.json"))


def test_a_second_run_of_the_same_suite_is_refused_while_the_first_runs(reference, copy, isolated_cache):
    """The lock held (here by this process, as a running `run` holds it): a second run stops at once, one line
    naming the holder; released, the run goes on and changes nothing."""
    from harness.runner.run import run_id_for
    from harness.runner.store import RunLock, RunStore

    store = RunStore(copy / "runs", "faults", run_id_for(load_suite(FAULTS)))
    env = {**os.environ, "DEFECTBENCH_CACHE": str(isolated_cache)}
    with RunLock(store):
        second = subprocess.run(CLI + ["run", str(FAULTS), "--results", str(copy)], env=env, capture_output=True,
                                text=True)
    errors = [line for line in second.stderr.splitlines() if line.startswith("defectbench: error:")]
    assert second.returncode == 2 and len(errors) == 1 and "Traceback" not in second.stderr
    assert f"pid {os.getpid()}" in errors[0] and "in use" in errors[0]
    _assert_redone_and_identical(copy, reference, set())


def test_two_runs_at_once_leave_one_complete_run(reference, tmp_path, isolated_cache):
    """Racing for real: whichever run gets the lock finishes, the other stops with one line or finds the work
    done; the result is the undisturbed leaderboard."""
    results = tmp_path / "results"
    env = {**os.environ, "DEFECTBENCH_CACHE": str(isolated_cache)}
    args = CLI + ["run", str(FAULTS), "--results", str(results)]
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    codes, errs = zip(*((p.wait(timeout=300), p.stderr.read()) for p in (first, second)))
    assert 0 in codes and set(codes) <= {0, 2}
    for code, err in zip(codes, errs):
        if code == 2:
            assert "in use by pid" in err and "Traceback" not in err
    assert board(results) == reference[1]


def _tables(md: str) -> list[list[list[str]]]:
    """The leaderboard's tables of values (header row first), as cells."""
    tables = []
    for block in md.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("| ")]
        if lines and lines[0].startswith("| Category |"):
            tables.append([[c.strip() for c in line.split("|")[1:-1]] for line in lines if not line.startswith("|--")])
    return tables


def test_kill_9_mid_run_then_resume(reference, tmp_path, isolated_cache):
    results = tmp_path / "results"
    env = {**os.environ, "DEFECTBENCH_CACHE": str(isolated_cache)}
    process = subprocess.Popen(CLI + ["run", str(FAULTS), "--results", str(results)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while _done_count(results) < N_JOBS // 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 0 < _done_count(results) < N_JOBS
    md, _ = board(results)  # the stopped run's leaderboard: what has not run is marked so, no bare cell
    cells = [cell for table in _tables(md) for row in table[1:] for cell in row[1:]]
    assert cells and "—" not in cells
    assert any(c.startswith("—<sup>0/") for c in cells) or any("/3</sup>" in c for c in cells)
    assert "jobs have not run (the run was stopped)" in md
    # the lock died with the process: the next run resumes at once
    assert subprocess.run(CLI + ["run", str(FAULTS), "--results", str(results)], env=env).returncode == 0
    assert board(results) == reference[1]


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_finished_work(reference, tmp_path, isolated_cache):
    """The results folder on a small tmpfs that fills mid-run (skipped where none can be mounted): one line naming
    the file and the space, no traceback; the finished jobs intact, and the run resumes elsewhere to the same
    leaderboard."""
    size = sum(p.stat().st_size for p in reference[0].rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 2}", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        env = {**os.environ, "DEFECTBENCH_CACHE": str(isolated_cache)}
        done = subprocess.run(CLI + ["run", str(FAULTS), "--results", str(disk / "results")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 2, done.stderr[-2000:]
        (error,) = [line for line in done.stderr.splitlines() if "error" in line.lower()]  # warnings, the bar aside
        assert error.startswith("defectbench: error: ") and done.stderr.rstrip().endswith(error), done.stderr
        assert "no space left on the device" in error and str(disk / "results") in error and " free)" in error
        assert "Traceback" not in done.stderr
        kept = tmp_path / "kept"
        shutil.copytree(disk / "results", kept, symlinks=True)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert 0 < _done_count(kept) < N_JOBS
    assert not list(kept.rglob("*.tmp"))  # nothing half-written
    assert not run(kept).failed
    assert board(kept) == reference[1]


# ---- moved results and data ---------------------------------------------------------------------------------


def test_results_moved_with_their_data_resume_with_nothing_recomputed(tmp_path, isolated_cache):
    from harness.data.synth import SynthConfig, synthesize
    import yaml

    data = synthesize(tmp_path / "a" / "data", SynthConfig(seed=0, size=48, n_train=6, n_validation=2,
                                                             n_test_good=2, n_defect=4, categories=("washer",)))
    raw = yaml.safe_load(FAULTS.read_text())
    raw["datasets"] = [{"name": "disk", "layout": "mvtec_ad", "root": "${DATA}", "categories": ["washer"]}]
    suite = tmp_path / "faults.yaml"
    suite.write_text(json.dumps(raw))
    first = run_suite(load_suite(suite, data=data), executor="serial", results=tmp_path / "a" / "results",
                      progress=False)
    assert not first.failed
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")  # nothing may still point there
    moved = tmp_path / "b" / "results"
    before = _statuses_of(moved)
    again = run_suite(load_suite(suite, data=tmp_path / "b" / "data"), executor="serial", results=moved,
                      progress=False)
    assert not again.failed and again.store.run_id == first.store.run_id
    assert _statuses_of(moved) == before  # nothing was recomputed
    manifest = (again.store.manifest_path).read_text()
    assert str(tmp_path / "a") not in manifest
    for records in moved.glob("runs/*/*/jobs/*/records.jsonl"):
        assert str(tmp_path / "a") not in records.read_text()


def _statuses_of(results: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in results.glob("runs/*/*/jobs/*/status.json")}
