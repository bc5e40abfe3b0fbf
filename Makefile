# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# a CPU build that lies on this machine's disk; GPU users: make TORCH=torch
TORCH ?= torch==2.13.0
NPROC ?= 1

.PHONY: venv test demo bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

bench: venv
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) data/demo checkpoints/demo
