"""Benchmarks (make bench-*): side-by-side runs in one invocation, each in a fresh process."""
