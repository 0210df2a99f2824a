"""Analytic quantization theory: MSE-optimal clipping for every distribution and grid.

The way in is flat::

    from theory import Gaussian, Laplace, optimal_alpha, expected_mse
    optimal_alpha(Laplace(b=0.02), bits=4, grid="aciq")   # = 0.02 * W(3 * 4^4)

Definitions (grids, distributions) follow docs/design.md. This package imports numpy, scipy and
sympy only, never torch or numba, and ``import theory`` itself imports only numpy: the numeric
path (``optimal_alpha``, ``expected_mse``, the bounds) runs on hand-written closed forms of each
family (``theory.distributions``), and sympy is imported when a derivation, its LaTeX or an
``*_expr`` is asked for. scipy submodules are imported where first used (``scipy.special`` by
families whose closed forms need it; ``scipy.stats`` by fits and scipy views, ``scipy.optimize``
by the few solvers that use it). ``python benchmarks/bench_import.py`` measures what this saves;
tests/test_theory_import.py checks which modules an import and a first call bring in.
"""

from .derivations import Derivation, all_derivations, gaussian_aciq, laplace_aciq, to_latex
from .distributions import (
    FAMILIES,
    Distribution,
    FamilyFit,
    Gaussian,
    GeneralizedGaussian,
    Laplace,
    Lognormal,
    StudentT,
    family,
)
from .grids import MAX_BITS, MIN_BITS, Grid, GridSpec, check_bits, grid_spec, levels, quantize
from .language_alpha import (
    LanguageAlphas, aciq_penalty_expr, alpha_penalty, language_alphas, laplace_penalty_expr,
    minimax_alpha, mixture_alpha, mixture_mse, weighted_alpha,
)
from .mse import clipping_mse, expected_mse, mse_derivative, rounding_mse
from .optimal import (
    allocate_bits,
    bias_correct,
    octav_alpha,
    octav_objective,
    optimal_alpha,
    optimal_mse,
)
from .curve import (
    CURVE_MODELS, CurveData, CurveModel, fit_curve_model, greedy_order, predict_curve,
    r2_out_of_sample, select_curve_model,
)
from .protection import (
    DamageModel,
    disparity_bound,
    min_linear_fractional,
    critical_fraction,
    disparity_curve,
    fit_sensitivities,
    rank_layers,
    sharpness_derivation,
)
from .site_models import (
    ChannelMixture, FamilySite, Mixture, SiteModel, bulk_outlier_model, fit_unit_shape,
    outlier_channels, select_site_model, unit_variance,
)
from .tails import (
    BodyTail, GeneralizedPareto, PotFit, choose_threshold, fit_pot, gpd_clipping_expr,
    gpd_derivation,
)
from .rate_distortion import (
    ECSQ_GAP_RATIO,
    LloydMaxResult,
    differential_entropy_bits,
    ecsq_gap_bits,
    ecsq_gap_db,
    ecsq_high_rate,
    gaussian_distortion_rate,
    lloyd_max,
    lloyd_max_gap_bits,
    panter_dite,
    panter_dite_constant,
    panter_dite_expr,
    pdf_cube_root_integral,
    shannon_lower_bound,
    shannon_lower_bound_expr,
    uniform_gap_bits,
    uniform_mse,
)

__all__ = [
    "disparity_bound", "min_linear_fractional",
    "LanguageAlphas", "aciq_penalty_expr", "alpha_penalty", "language_alphas", "laplace_penalty_expr",
    "minimax_alpha", "mixture_alpha", "mixture_mse", "weighted_alpha",
    # distributions
    "Distribution", "Gaussian", "Laplace", "Lognormal", "GeneralizedGaussian", "StudentT",
    "FAMILIES", "family", "FamilyFit",
    # grids
    "Grid", "GridSpec", "grid_spec", "levels", "quantize", "check_bits", "MIN_BITS", "MAX_BITS",
    # MSE
    "expected_mse", "clipping_mse", "rounding_mse", "mse_derivative",
    # optimal clipping
    "optimal_alpha", "optimal_mse", "octav_alpha", "octav_objective", "allocate_bits",
    "bias_correct",
    # derivations
    "Derivation", "laplace_aciq", "gaussian_aciq", "to_latex", "all_derivations",
    # protection
    "DamageModel", "fit_sensitivities", "rank_layers", "disparity_curve", "critical_fraction",
    "sharpness_derivation",
    # curve models: d_l(S) beyond first order, selected on training points, judged out of sample
    "CURVE_MODELS", "CurveData", "CurveModel", "fit_curve_model", "select_curve_model", "predict_curve",
    "greedy_order", "r2_out_of_sample",
    # site models (a whole tensor under one threshold) and tails
    "SiteModel", "FamilySite", "ChannelMixture", "Mixture", "bulk_outlier_model", "fit_unit_shape",
    "outlier_channels", "select_site_model", "unit_variance",
    "BodyTail", "GeneralizedPareto", "PotFit", "choose_threshold", "fit_pot", "gpd_clipping_expr",
    "gpd_derivation",
    # rate-distortion reference points and Lloyd-Max
    "shannon_lower_bound", "shannon_lower_bound_expr", "differential_entropy_bits",
    "gaussian_distortion_rate", "panter_dite", "panter_dite_constant", "panter_dite_expr",
    "pdf_cube_root_integral", "ecsq_gap_bits", "ecsq_gap_db", "ecsq_high_rate", "ECSQ_GAP_RATIO",
    "uniform_mse", "uniform_gap_bits", "lloyd_max", "LloydMaxResult", "lloyd_max_gap_bits",
]
