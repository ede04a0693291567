"""Measurements that print figures (not tests); ``python -m benchmarks`` runs them all (benchmarks/suite.py)."""
