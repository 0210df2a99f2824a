"""The synthetic members of each distribution family that the synthetic experiments share
(``validate.optimal_alpha``, ``validate.rate_distortion``), and seeded samples of them."""

from __future__ import annotations

import numpy as np

__all__ = ["SYNTHETIC_FAMILIES", "synthetic_distribution", "sample_family", "valid_pair", "family_label"]

#: family name -> the representative member (unit-ish scale) used by the synthetic experiments
SYNTHETIC_FAMILIES = ("gaussian", "laplace", "gennorm", "student_t", "lognormal")

def synthetic_distribution(family: str):
    """The member of ``family`` used in the synthetic experiments."""
    from theory import Gaussian, GeneralizedGaussian, Laplace, Lognormal, StudentT

    table = {
        "gaussian": lambda: Gaussian(1.0),
        "laplace": lambda: Laplace(1.0),
        "gennorm": lambda: GeneralizedGaussian(0.8, 1.0),  # heavier than Laplace
        "student_t": lambda: StudentT(6.0, 1.0),  # finite 4th moment: the MSE has a standard error
        "lognormal": lambda: Lognormal(0.0, 0.6),
    }
    if family not in table:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(table)}")
    return table[family]()


def valid_pair(family: str, grid: str) -> bool:
    """One-sided data goes with the one-sided grid only (docs/design.md, "Quantizer grids")."""
    from theory.grids import Grid

    return synthetic_distribution(family).one_sided == Grid.parse(grid).one_sided


def sample_family(family: str, samples: int, seed: int) -> np.ndarray:
    """Seeded float64 samples of the synthetic member of ``family`` (independent per family)."""
    dist = synthetic_distribution(family)
    fam_id = sorted(SYNTHETIC_FAMILIES).index(family)
    rng = np.random.default_rng([int(seed), fam_id])
    return np.asarray(dist.scipy.rvs(size=int(samples), random_state=rng), dtype=np.float64)


def family_label(family: str) -> str:
    """How the paper names a family (the family class's ``label``)."""
    from theory import FAMILIES

    return FAMILIES[family].label if family in FAMILIES else family
