# DefectBench: `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-slow bench clean-cache help

help:
	@echo "make demo        synthesize the embedded data set, generate with every model-free baseline, score, print a table"
	@echo "make test        install if needed, run the test suite (fast checks; slow ones: make test-slow)"
	@echo "make bench       speed benchmarks in tests/benchmarks (slow; prints ratios)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/defectbench demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python -m pytest -o addopts="-q" -p no:cacheprovider -s tests/benchmarks

clean-cache:
	rm -rf results/cache
