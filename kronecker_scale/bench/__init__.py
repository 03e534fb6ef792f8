"""Benchmarks (tools, not tests): ratios taken in one run; absolute figures only from a GPU."""
