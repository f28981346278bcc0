"""jpaged's benchmarks: scripts (python benchmarks/NAME.py) that also import as modules (benchmarks.NAME)."""
