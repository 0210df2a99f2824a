"""Empirical side: numba MSE sweeps, distribution fits, model loading, activation capture."""
