"""Measurement scripts: `python bench/bench.py` (CPU) and `bench/gpu.sh` (CUDA)."""
