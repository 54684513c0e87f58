"""Benchmarks of edit quality: ShapesBench (offline, analytic)."""
