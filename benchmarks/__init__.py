"""Benchmarks for inference-worker: `python -m benchmarks.bench` (see RESULTS.md)."""
