"""Reproducible measurements that print a table; see benchmarks/README.md."""
