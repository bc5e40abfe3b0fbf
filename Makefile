# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# a CPU build that lies on this machine's disk; GPU users: make TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: venv test demo bench compare clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

# `make demo`: a small ProsQA-style split (7-node graphs instead of 28, every answer exactly
# 3 hops away) into data/demo/, then the tiny GPT-2 of models/prosqa-gpt2-tiny trained
# from scratch through the whole Coconut curriculum (args/demo.yaml: 2 epochs of
# chain-of-thought, then 1, 2, 3 continuous thoughts), printing the validation accuracy
# after every epoch, 12 epochs. 10 to 15 minutes on 2 idle CPU cores, venv setup included (README).
# The thread count is fixed, so the same command gives the same numbers on any machine
# (float sums depend on how they are split over threads); DEMO_THREADS=1 suits a machine
# busy with other work, and gives other (equally valid) numbers.
# Each `make demo` starts a fresh run: run.py would otherwise resume checkpoints/demo
# (and, once finished, do nothing); `python run.py args/demo.yaml` alone resumes. The
# folder is emptied under its lock: never under a run that still writes into it.
# DEMO_SEED picks another generated data set (`make demo DEMO_SEED=1`)
DEMO_SEED ?= 0
DEMO_DATA_ARGS := --split_sizes 6000,200,500 --num_nodes 7 --min_steps 3 --max_steps 3 --seed $(DEMO_SEED)
DEMO_THREADS ?= 2

demo: venv
	$(PY) preprocessing/prosqa.py --split $(DEMO_DATA_ARGS) --output_dir data/demo
	@if [ -d checkpoints/demo ]; then echo "removing the previous demo run checkpoints/demo: training starts from scratch"; fi
	$(PY) runlock.py --clear checkpoints/demo
	WANDB_MODE=disabled OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) run.py args/demo.yaml

# `make bench`: CPU benchmarks against the naive algorithm (bench/bench.py: step time per
# stage, memory, generation), the dispatch-bound proxy of a GPU step (bench/proxy.py), FSDP's
# weight gathers in latent passes on 2 processes (bench/fsdp_proxy.py), and,
# after `make demo`, one epoch of args/demo.yaml (temporary checkpoints, wandb disabled);
# last, the proxy with compile: True, in what is left of the 10 minutes.
# Under 10 minutes on 2 cores; writes bench/results/ only.
bench: venv
	$(PY) bench/bench.py

# `make compare`: the paper's Table 1 in miniature (bench/compare.py): the demo's model and
# budget trained with cot, no_cot, coconut, coconut without curriculum, no_thoughts and
# pause_as_thought on 3 data seeds, 2 runs at a time; the best-validation checkpoint of
# each answers a held-out test split. Writes bench/results/compare.json and compare.png;
# runs, logs and exports go to runs/compare/ (a stopped compare resumes). About 2 hours
# on 2 cores (README). Not part of `make test`.
compare: venv
	$(PY) bench/compare.py

clean:
	rm -rf $(VENV) data/demo checkpoints/demo
