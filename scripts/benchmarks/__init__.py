"""Benchmarks of the bundle (never imported by its runtime): ``python -m scripts.benchmarks --help``."""
