"""Benchmarks of the speed targets, each `python -m bench.<name>` from the repo root (README.md)."""
