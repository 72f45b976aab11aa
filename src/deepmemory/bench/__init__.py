"""Benchmarks: scripts that print tables (tokens/s, peak memory, ratio to a peer measured in the same run)."""
