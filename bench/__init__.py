"""Benchmarks for stemgen; each subpackage runs with ``python -m bench.NAME``."""
