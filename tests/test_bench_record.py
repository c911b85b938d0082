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
