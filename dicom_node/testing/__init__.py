"""Helpers that the tests and benchmarks share (never used by the running node)."""
