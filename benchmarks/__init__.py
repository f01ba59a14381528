"""Benchmarks of exported graphs against their eager modules."""
