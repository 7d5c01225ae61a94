"""Benchmarks of clipfleet. Run them from the repository root, for example `python benchmarks/throughput.py`."""
