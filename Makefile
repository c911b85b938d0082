# DefectBench: `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: install demo smoke test test-slow bench bench-table bench-gpu bench-gpu-table backbone leaderboard suite-mvtec-ad suite-mvtec-loco suite-mvtec-caption clean-cache help

help:
	@echo "make demo                 every method, downstream model and four detectors on one synthetic category, on Ray"
	@echo "make smoke                the same on all three synthetic categories (the smoke suite)"
	@echo "make test                 install if needed, run the test suite"
	@echo "make test-slow            the tests too slow for make test (CI runs them as its second step)"
	@echo "make suite-mvtec-ad DATA=/path/to/mvtec_anomaly_detection     (also suite-mvtec-loco, suite-mvtec-caption)"
	@echo "make leaderboard          re-render results/leaderboard/*.md and *.tex from the records"
	@echo "make bench                speed benchmarks in tests/benchmarks (slow; prints ratios)"
	@echo "make bench-table          the README's CPU benchmark table and the methods' claims tables, from results/bench"
	@echo "make bench-gpu            the paper profile's cost per method on this machine's GPU (random full-width models)"
	@echo "make backbone             train the tiny backbone again into $(RETRAINED), measure it, render its card"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/defectbench run demo

smoke: $(STAMP)
	$(BIN)/defectbench run smoke

suite-mvtec-ad suite-mvtec-loco suite-mvtec-caption: $(STAMP)
	$(BIN)/defectbench run $(patsubst suite-%,%,$@) $(if $(DATA),--data "$(DATA)")

leaderboard: $(STAMP)
	$(BIN)/defectbench leaderboard

test: $(STAMP)
	$(BIN)/python -m pytest

# the tests too slow for `make test` (pytest -m slow): CI's second step
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python -m pytest -o addopts="-q" -p no:cacheprovider -s tests/benchmarks

# the paper profile's seconds per fit step and per image and peak memory (tests/benchmarks/paper_gpu.py): writes
# results/bench/paper_gpu.json, from which the README's table is rendered (make bench-gpu-table prints it)
bench-gpu: $(STAMP)
	$(BIN)/python -m tests.benchmarks.paper_gpu

bench-table: $(STAMP)
	@$(BIN)/python -m tests.benchmarks.record --write-readme

bench-gpu-table: $(STAMP)
	@$(BIN)/python -m tests.benchmarks.paper_gpu --render

# the shipped tiny backbone, trained again from harness/diffusion/shipped.py's recipe (about 2 h 20 min on 2 CPU
# cores, resumable; minutes on a GPU); compare it with backbones/defectbench-tiny, then put it there
RETRAINED ?= backbones/defectbench-tiny.retrained
backbone: $(STAMP)
	$(BIN)/defectbench backbone train --out $(RETRAINED)
	$(BIN)/defectbench backbone measure --folder $(RETRAINED)

clean-cache:
	rm -rf results/cache
