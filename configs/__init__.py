"""Experiment configs: `default.py` holds the shared fields, each other file one experiment."""
