"""The command line, end to end, on synthetic and real data."""
from __future__ import annotations

import json


from harness.cli import main
from tests.fixtures import shared


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_synth_inspect_split_methods(tmp_path, capsys):
    root = tmp_path / "syn"
    assert run(capsys, "synth", root, "--size", 48, "--n-train", 4, "--n-defect", 3, "--n-test-good", 2)[0] == 0
    code, out, _ = run(capsys, "inspect", root)
    assert code == 0 and "tray" in out and "0 problems" in out
    code, out, _ = run(capsys, "split", root, "--category", "pill", "--protocol", "anomalydiffusion", "--out", tmp_path / "m.json")
    assert code == 0 and "in both" in out
    assert json.loads((tmp_path / "m.json").read_text())["folds"][0]["protocol"] == "anomalydiffusion"
    code, out, _ = run(capsys, "methods")
    assert code == 0 and all(name in out for name in ("cutpaste", "croppaste", "draem"))


def test_generate_and_score_synthetic(tmp_path, synth_root, capsys):
    out = tmp_path / "gen"
    code, text, err = run(capsys, "generate", "--method", "cutpaste", "--data", synth_root, "--category", "weave",
                          "--defect", "hole", "--n", 4, "--out", out)
    assert code == 0, err
    assert len(list((out / "images").glob("*.png"))) == 4 and (out / "samples.jsonl").is_file()
    real = synth_root / "weave" / "test" / "hole"
    code, text, err = run(capsys, "score", out, "--real", real, "--centres", real, "--json", tmp_path / "s.json")
    assert code == 0, err
    for label in ("IS", "FID", "KID", "IC-LPIPS", "BG-PSNR", "Mask-IoU"):
        assert label in text
    assert {v["metric"] for v in json.loads((tmp_path / "s.json").read_text())} >= {"is", "fid", "kid", "ic_lpips"}


def test_errors_exit_2_with_one_line(tmp_path, synth_root, capsys):
    code, _, err = run(capsys, "generate", "--method", "nope", "--data", synth_root, "--category", "weave",
                       "--defect", "hole", "--n", 1, "--out", tmp_path / "x")
    assert code == 2 and "unknown method 'nope'" in err
    code, _, err = run(capsys, "inspect", tmp_path / "missing")
    assert code == 2 and "data set root not found" in err
    code, _, err = run(capsys, "generate", "--method", "draem", "--data", synth_root, "--category", "weave",
                       "--defect", "nosuch", "--n", 1, "--out", tmp_path / "x")
    assert code == 2 and "no defect type 'nosuch'" in err and not (tmp_path / "x").exists()
    code, _, err = run(capsys, "score", tmp_path / "nothing", "--real", synth_root / "weave" / "test" / "hole")
    assert code == 2 and "nothing" in err


def test_magnetic_tile_end_to_end(tmp_path, capsys):
    root = shared("magnetic-tile")
    code, out, _ = run(capsys, "split", root, "--category", "magnetic_tile", "--out", tmp_path / "m.json")
    assert code == 0 and "crack" in out
    gen = tmp_path / "gen"
    code, _, err = run(capsys, "generate", "--method", "croppaste", "--data", root, "--category", "magnetic_tile",
                       "--defect", "fray", "--n", 4, "--out", gen)
    assert code == 0, err
    code, out, err = run(capsys, "score", gen, "--data", root, "--category", "magnetic_tile", "--defect", "fray")
    assert code == 0, err
    assert "IC-LPIPS" in out and "BG-PSNR" in out


def test_the_command_line_loads_no_network_library_for_its_help():
    """The IC-LPIPS presets and the metric table are torch-free: `defectbench --help` lists them without torch."""
    import subprocess
    import sys

    code = "import sys, harness.cli; harness.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
