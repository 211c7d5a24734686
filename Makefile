# Two commands do all set-up on a fresh machine:  `make demo` (the main job) and `make test` (the suite).
# torch is pinned to the 2.13.0 CPU build first: without the pin pip would pull the newest CUDA build (several GB).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: env demo test bench clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: env
	$(PY) -m trl_dpo_plus.demo

test: env
	$(PY) -m pytest -q

bench: env
	$(PY) benchmarks/bench_trainer.py

clean:
	rm -rf $(VENV) build *.egg-info
