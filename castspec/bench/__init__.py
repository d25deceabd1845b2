"""Benchmarks: standard prompt sets, methods interleaved per prompt, results as JSON, a table and plots."""
