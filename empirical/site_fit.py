"""Every site model of ``theory.site_models`` fitted from one capture pass, and what each costs.

For one site x language (a :class:`empirical.capture.StreamingStats`), :func:`fit_site_models`
builds, without another forward pass:

* ``unimodal`` - the best family by BIC for which theory has an alpha* (today's model), fitted to
  the reservoir sample (:func:`empirical.fits.fit_all`, location fixed at 0);
* ``channel_mixture/<shape>`` for each shape of :data:`theory.site_models.SHAPES` - every channel
  its own mean and standard deviation from the streaming per-channel power sums, the shared
  unit-variance shape fitted to the fit half of the reservoir standardized by its channels
  (:func:`theory.site_models.fit_unit_shape`); ``channel_mixture`` is the one whose curve best
  matches the held-out half;
* ``bulk_outlier`` - the outlier channels (:func:`theory.site_models.outlier_channels`: RMS over
  6x the median channel's, at most 5% of channels) each with its own mean and scale under the
  selected channel shape, plus one unimodal fit of the other channels' sampled values;
* ``body_tail`` - a body family plus a generalized Pareto tail above a threshold chosen by a
  goodness-of-fit diagnostic (:class:`theory.tails.BodyTail`), fitted to the reservoir sample and
  the exact top magnitudes;
* ``selected`` - the model whose predicted MSE curve best matches the *held-out* half of the
  stratified sample (:func:`theory.site_models.select_site_model`, at ``select_bits``).

:func:`excess_rows` prices each model's alpha* against the exact sweep of the stratified sample
(the exact top-K magnitudes plus a weighted uniform reservoir of the rest:
:func:`empirical.optimal.stratified_mse`), an estimate of the MSE over *all* captured values.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["fit_site_models", "excess_rows", "SELECT_GRID_POINTS", "model_curve", "reference_curve"]

#: alphas (log-spaced, a factor 8 either side of the held-out optimum) at which curves are compared
SELECT_GRID_POINTS = 24


def _channel_mixtures(st, z, seed: int) -> dict[str, Any]:
    from theory.site_models import SHAPES, ChannelMixture, fit_unit_shape

    out: dict[str, Any] = {}
    for shape in SHAPES:
        try:
            params = fit_unit_shape(z, shape)
            out[f"channel_mixture/{shape}"] = ChannelMixture.from_power_sums(
                st.channel_count, st.channel_sum, st.channel_sumsq, family=shape, shape=params,
                absmax=st.channel_absmax, name=f"channel_mixture/{shape}")
        except (ValueError, RuntimeError) as exc:
            out[f"channel_mixture/{shape}"] = exc
    return out


def _unimodal(x, name: str, bits: int, grid: str, seed: int):
    """``(FamilySite, family)`` of the best family by BIC (location 0) whose alpha* exists at
    ``bits``: a Student-t with ``nu <= 2`` has none, and neither has a fit whose curve falls off
    the scanned range."""
    from empirical.fits import fit_all
    from theory.site_models import FamilySite

    for f in fit_all(x, seed=seed, fix_loc=True):
        try:
            m = FamilySite(f.to_theory(), name=name)
            m.optimal_alpha(bits, grid)
            return m, f.family
        except (ValueError, RuntimeError):
            continue
    raise ValueError(f"no family fitted to the {name} values has a finite alpha*")


def fit_site_models(st, bits: int, grid: str = "int", seed: int = 0,
                    select_bits: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """All site models of one site x language and the held-out selection.

    Returns ``(models, info)``: ``models`` maps a model name to a ``SiteModel`` or to the
    exception that stopped its fit (reported, never silently dropped); ``info`` has the
    selection's curve distances, the outlier channels and the fitted shapes.
    """
    from empirical.optimal import stratified_mse, stratified_optimal_alpha
    from theory.site_models import bulk_outlier_model, outlier_channels, select_site_model

    select_bits = bits if select_bits is None else select_bits
    x = st.sample()
    ch = st.sample_channels()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(x.size)
    fit_idx = perm[: x.size // 2]
    models: dict[str, Any] = {}
    info: dict[str, Any] = {}
    # unimodal: today's model, on the whole reservoir (as validate.distributions always did)
    try:
        models["unimodal"], info["unimodal_family"] = _unimodal(x, "unimodal", bits, grid, seed)
    except Exception as exc:  # a failed fit is reported in the row, the other models go on
        models["unimodal"] = exc
    # channel mixtures: per-channel moments from the power sums, shape from the fit half
    mean = st.channel_sum / st.channel_count
    std = np.sqrt(np.maximum(st.channel_sumsq / st.channel_count - mean * mean, 0.0))
    ok = std[ch[fit_idx]] > 0
    z = (x[fit_idx][ok] - mean[ch[fit_idx]][ok]) / std[ch[fit_idx]][ok]
    models.update(_channel_mixtures(st, z, seed))
    info["shapes"] = {k: list(m.shape) for k, m in models.items()
                      if k.startswith("channel_mixture/") and not isinstance(m, Exception)}
    # held-out curve of the other half
    half_a, half_b = st.stratified().split(seed)
    try:
        ref_b = stratified_optimal_alpha(half_b, select_bits, grid).alpha
        alphas = np.geomspace(ref_b / 8.0, ref_b * 8.0, SELECT_GRID_POINTS)
        held = stratified_mse(half_b, alphas, select_bits, grid)
    except (ValueError, RuntimeError) as exc:
        alphas, held = None, None
        info["selection_error"] = f"{type(exc).__name__}: {exc}"
    cms = {k: m for k, m in models.items() if k.startswith("channel_mixture/") and not isinstance(m, Exception)}
    best_cm = None
    if cms and alphas is not None:
        best_cm, _ = select_site_model(cms, alphas, held, select_bits, grid)
    elif cms:
        best_cm = next(iter(cms))
    # bulk plus outlier channels
    if best_cm is not None:
        cm = cms[best_cm]
        models["channel_mixture"] = cm  # the shape whose curve matches the held-out half best
        info["channel_mixture_shape"] = best_cm.split("/", 1)[1]
        out = outlier_channels(cm.loc, cm.scale)
        info["outlier_channels"] = [int(c) for c in out]
        info["outlier_share_of_energy"] = float(np.sum(st.channel_sumsq[out]) / np.sum(st.channel_sumsq)) \
            if out.size else 0.0
        try:
            bulk, _ = _unimodal(x[~np.isin(ch, out)], "bulk", bits, grid, seed)
            models["bulk_outlier"] = bulk_outlier_model(bulk, cm, out)
        except Exception as exc:
            models["bulk_outlier"] = exc
    # body plus generalized Pareto tail
    try:
        from theory.tails import BodyTail

        models["body_tail"] = BodyTail.fit(x)
    except Exception as exc:
        models["body_tail"] = exc
    # selection among every model that fitted, by the held-out curve
    usable = {k: m for k, m in models.items() if not isinstance(m, Exception)}
    if usable and alphas is not None:
        name, dist = select_site_model(usable, alphas, held, select_bits, grid)
        models["selected"] = usable[name]
        info["selected"] = name
        info["curve_distance"] = {k: (v if math.isfinite(v) else None) for k, v in dist.items()}
    return models, info


def excess_rows(st, models: Mapping[str, Any], bits_list: Sequence[int], grid: str = "int",
                detail_bits: int | None = None) -> list[dict]:
    """For each bit width and model: theory's alpha*, the stratified sweep's optimum, and the
    extra MSE ``MSE(alpha_model) / MSE(alpha_swept) - 1`` on the stratified sample (all values).

    The mixtures of every shape (``channel_mixture/<shape>``) are priced only at ``detail_bits``
    when it is given; at the other widths ``channel_mixture`` (the held-out choice of shape)
    stands for them: an 8-bit exact curve of a heavy-tailed shape over 2048 channels costs
    seconds."""
    from empirical.optimal import stratified_mse, stratified_optimal_alpha

    sample = st.stratified()
    rows = []
    for bits in bits_list:
        ref = stratified_optimal_alpha(sample, bits, grid)
        done: dict[int, float] = {}  # "selected" is one of the others: its alpha* is not searched again
        for name, m in models.items():
            if detail_bits is not None and "/" in name and bits != detail_bits:
                continue
            row = {"bits": int(bits), "model": name, "alpha_swept": ref.alpha, "mse_swept": ref.mse}
            if isinstance(m, Exception):
                row["error"] = f"{type(m).__name__}: {m}"
            else:
                try:
                    a = done[id(m)] if id(m) in done else m.optimal_alpha(bits, grid)
                    done[id(m)] = a
                    mse = float(stratified_mse(sample, np.array([a]), bits, grid)[0])
                    row.update(alpha=a, excess=max(mse / ref.mse - 1.0, 0.0) if ref.mse > 0 else None)
                except (ValueError, RuntimeError) as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
    return rows


def model_curve(model, alphas, bits: int, grid: str = "int") -> np.ndarray:
    """A model's MSE at each alpha (NaN where it cannot be evaluated)."""
    try:
        return np.asarray(model.mse(np.asarray(alphas, dtype=np.float64), bits, grid), dtype=np.float64)
    except (ValueError, RuntimeError):
        return np.full(np.shape(alphas), np.nan)


def reference_curve(st, alphas, bits: int, grid: str = "int") -> np.ndarray:
    """The stratified sample's MSE at each alpha (the measured curve of all values)."""
    from empirical.optimal import stratified_mse

    return np.asarray(stratified_mse(st.stratified(), np.asarray(alphas, dtype=np.float64), bits, grid))
