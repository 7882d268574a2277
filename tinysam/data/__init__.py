"""Datasets, image I/O and the synthetic toy world."""
