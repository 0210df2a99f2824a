"""Analytic quantization theory (in progress)."""
from .grids import Grid, grid_spec, levels, quantize, check_bits
