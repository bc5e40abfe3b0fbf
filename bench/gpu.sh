#!/usr/bin/env bash
# Coconut on one CUDA GPU, the rows of issue 13's table: bf16 training steps at stages 0
# and 6 (ours, ours with `fused_gelu: False`, ours with `lean_passes` off, and the
# published algorithm; ms, tokens/s, MFU, stage 6 / stage 0), eager steps with cuDNN
# attention on and off, the same training steps with `compile: True`, and generation
# questions/s at batch 1 and 64 against the naive batch-1 loop, with the eager decoding
# loop and with the CUDA-graph step.
# Nothing is downloaded (random-weight GPT-2 124M, generated ProsQA-shaped batches).
# Needs torch with CUDA and transformers only: uses $PYTHON when set, else .venv/bin/python
# when present, else python3. Extra arguments go to bench/gpu_bench.py (--help).
# Without a CUDA GPU it prints one line and exits 2. On one H100 host: training 30 s,
# attention 25 s, generation 80 s (half of it warming up), then the compile section,
# about 5 minutes (4 graphs of a minute each; --layers 2: about a minute), which runs
# only if it starts within --budget-s; --skip training|attention|generation|compile
# splits the run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi
exec "$PY" bench/gpu_bench.py "$@"
