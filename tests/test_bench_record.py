"""The README's CPU benchmark table is rendered from the benchmarks' JSON (results/bench/cpu-*.json), not typed."""
from __future__ import annotations

import json

import pytest

from tests.benchmarks import record


def test_the_readme_table_is_rendered_from_the_benchmarks_json():
    readme = (record.REPO / "README.md").read_text(encoding="utf-8")
    records = record.load()
    assert len(records) >= 7 and all(r["date"] and r["commit"] for r in records)
    assert record.readme_block(readme) == record.render(records)


def test_a_written_row_carries_its_date_commit_and_machine_and_renders(tmp_path):
    path = record.write("example", what="a thing against another", baseline="other 10 s", result="thing 5 s, **0.50x**",
                        target="≤ 0.65x", measured={"ratio": 0.5}, out=tmp_path)
    (row,) = record.load(tmp_path)
    assert path.name == "cpu-example.json" and row["measured"] == {"ratio": 0.5}
    assert row["commit"] and row["machine"] and len(row["date"]) == 10
    table = record.render([row])
    assert "`test_bench_example.py`: a thing against another | other 10 s | thing 5 s, **0.50x** | ≤ 0.65x" in table
    assert "transcribed" not in table


def test_a_row_missing_its_date_is_an_error_naming_the_file(tmp_path):
    path = record.write("example", what="w", baseline="b", result="r", target="t", measured={}, out=tmp_path)
    data = json.loads(path.read_text())
    data["date"] = ""
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"cpu-example.json: missing date"):
        record.load(tmp_path)


def test_each_methods_claims_table_is_rendered_from_its_claim_tests_json():
    methods = record.methods_with_claims()
    with_claim_tests = sorted(p.parents[1].name for p in (record.REPO / "methods").glob("*/tests/test_*.py")
                              if "claim_tests(" in p.read_text(encoding="utf-8"))
    assert methods == with_claim_tests and len(methods) == 5
    for method in methods:
        readme = (record.REPO / "methods" / method / "README.md").read_text(encoding="utf-8")
        assert record.claims_block(readme, method) == record.render_claims(method), method


def test_a_claim_tests_record_keeps_every_variants_measures_and_what_it_fails(tmp_path):
    import numpy as np

    claims = {"kept": lambda m: m["psnr"] >= 36, "drawn": lambda m: m["contrast"] >= 1.5}
    variants = {"working": {"psnr": np.float32(40.0), "contrast": 2.0, "samples": ["an image"], "flag": True},
                "no blend": {"psnr": 12.5, "contrast": 1.0}}
    path = record.write_claims("example", "methods/example/tests/test_example.py", claims, {"no blend": None},
                               variants, out=tmp_path)
    assert path.name == "claims-example.json"
    table = record.render_claims("example", tmp_path)
    assert "| working | 40 | 2 | nothing |" in table and "| no blend | 12.5 | 1 | kept; drawn |" in table
    assert "flag" not in table and "samples" not in table and "`methods/example/tests/test_example.py`" in table
    assert record.render_claims("other", tmp_path).startswith("Not measured yet")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Example\n\n{record.claims_start('example')}\nold\n{record.CLAIMS_END}\n\nafter\n")
    record.update_claims(readme, "example", tmp_path)
    assert record.claims_block(readme.read_text(), "example") == table and readme.read_text().endswith("after\n")


def test_a_claim_record_names_a_measure_that_is_not_a_number_and_stays_valid_json(tmp_path):
    claims = {"masks drawn": lambda m: m["shape"] <= 2.0}
    path = record.write_claims("example", "methods/example/tests/test_example.py", claims, {},
                               {"working": {"shape": float("inf"), "background": float("nan")}}, out=tmp_path)
    json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert "| working | inf | nan | masks drawn |" in record.render_claims("example", tmp_path)
