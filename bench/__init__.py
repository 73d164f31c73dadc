"""Benchmarks, run from the repository root as modules: `python -m bench.engine_bench` and so on."""
