# Two commands do all set-up on a fresh machine:  `make demo` (the main job) and `make test` (the suite).
# torch is pinned to the 2.13.0 CPU build first: without the pin pip would pull the newest CUDA build (several GB).
# The demo installs only what it needs (the package and matplotlib); the suite adds the test extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: env demo test bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	touch $@

$(VENV)/.demo: $(VENV)/.base
	$(PY) -m pip install -q -e ".[plot]"
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e ".[test]"
	touch $@

env: $(VENV)/.test

demo: $(VENV)/.demo
	$(PY) -m trl_dpo_plus.demo

test: $(VENV)/.test
	$(PY) -m pytest -q

bench: $(VENV)/.test
	$(PY) benchmarks/bench_trainer.py

clean:
	rm -rf $(VENV) build *.egg-info
