"""Throughput bench: ``python -m bench.throughput`` (see __main__)."""
