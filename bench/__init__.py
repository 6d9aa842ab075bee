"""distft benchmarks: `python -m bench` (CPU suite) and `python bench/gpu.py` (one GPU)."""
