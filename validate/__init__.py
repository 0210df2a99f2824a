"""Experiments: one module per experiment, each writes a figure, a table and a JSON result."""
