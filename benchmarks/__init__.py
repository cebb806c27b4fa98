"""Reproducible measurements; each writes its results, command and machine under benchmarks/results/."""
