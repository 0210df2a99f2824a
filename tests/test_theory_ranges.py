"""Theory holds over the whole range a class accepts, or refuses with the reason (issue #13).

Each test plants an input at the edge of float64 (a scale that underflows, a threshold whose
square overflows, data near 1e200, an extreme lognormal shape) and checks for either a finite,
independently checked value or a ValueError that names the problem.
"""

import math

import numpy as np
import pytest

from theory import Laplace, Lognormal, expected_mse, optimal_alpha


@pytest.mark.parametrize("mu", [-1000.0, -400.0, 400.0, 1000.0])
def test_lognormal_mu_whose_scale_under_or_overflows_is_refused(mu):
    # exp(-1000) is 0.0 in float64: the distribution used to be accepted with scale 0 and
    # optimal_alpha returned 0.0 without a word.
    with pytest.raises(ValueError, match="mu"):
        Lognormal(mu, 1.0)
    with pytest.raises(ValueError, match="mu"):
        Lognormal(np.array([0.0, mu]), 1.0)


@pytest.mark.parametrize("mu", [-300.0, 300.0])
def test_lognormal_mu_at_the_edge_of_the_range_scales_exactly(mu):
    d = Lognormal(mu, 0.5)
    assert d.scale == pytest.approx(math.exp(mu), rel=1e-12)
    assert optimal_alpha(d, 4, "uint") == pytest.approx(
        optimal_alpha(Lognormal(0.0, 0.5), 4, "uint") * math.exp(mu), rel=1e-9)
