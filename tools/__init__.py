"""Target programs and benchmarks (not part of the installed package)."""
