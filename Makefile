# The two commands of the README: `make train` (main job) and `make test`.
# `make train` installs what training needs (".[experiments]"); `make test` and `make bench` add the
# dev extra (pytest, torch==2.13.0 for the parity tests and the benchmark, ...). On Linux from PyPI,
# pip picks torch's default (CUDA) build: for the CPU build, first run
#   .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.created
EXP_STAMP := $(VENV)/.installed-experiments
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: train test bench install clean

$(VENV_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(EXP_STAMP): pyproject.toml | $(VENV_STAMP)
	$(PY) -m pip install --quiet -e ".[experiments]"
	touch $@

# (dev includes experiments: its install brings the training dependencies up to date too)
$(DEV_STAMP): pyproject.toml | $(VENV_STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@ $(EXP_STAMP)

install: $(DEV_STAMP)

train: $(EXP_STAMP)
	$(PY) -m experiments.train --config configs/bbc_news.py --workdir runs/bbc_news

test: $(DEV_STAMP)
	$(PY) -m pytest -q -n 2 tests

bench: $(DEV_STAMP)
	$(PY) -m experiments.benchmark --config configs/bench_reference.py --workdir runs/bench

clean:
	rm -rf $(VENV) runs .pytest_cache
