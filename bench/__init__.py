"""Benchmarks of blockstore against raw-disk ceilings measured in the same run (see README.md)."""
