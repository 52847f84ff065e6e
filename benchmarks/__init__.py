"""Benchmark scripts; each prints a Markdown section for docs/benchmarks.md."""
