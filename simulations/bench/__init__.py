"""Benchmarks that print figures: ``python -m simulations.bench NAME``."""
