#!/usr/bin/env bash
# Coconut on one CUDA GPU: training tokens/s and MFU at stages 0 and 6 (bf16), and
# generation questions/s at batch 1 and 64 against the naive batch-1 loop.
# Nothing is downloaded (random-weight GPT-2 124M, generated ProsQA-shaped batches).
# Needs torch with CUDA and transformers: uses .venv/bin/python when present, else
# $PYTHON, else python3. Extra arguments go to bench/gpu_bench.py (--help).
# Without a CUDA GPU it prints one line and exits 2. Takes well under 5 minutes.
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
