"""Benchmarks: each scenario prints one JSON summary line (`make bench`)."""
