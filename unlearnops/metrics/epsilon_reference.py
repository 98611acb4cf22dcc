"""SLOW oracle: a direct, readable port of the released per-example epsilon loop.

Used only by tests and benchmarks/bench_epsilon.py to check `epsilon.per_example_epsilons`.
It compares every model's value with every threshold (about 160,000 interval attacks per
example, times N models), as the released `metric.py` does on a GPU; at N = 512 that is
roughly a second per example here. Do not use it for scoring.

Spec: docs/metric.md, section 1. Threshold grids come from the same helpers
as the fast version, so both evaluate exactly the same thresholds; everything else (positive
side, range-ratio rule, rates, discard rules, cap) is written out independently here.
"""

from __future__ import annotations

import numpy as np

from unlearnops.metrics.epsilon import (
    DELTA,
    EPSILON_CAP,
    PEAKY_RANGE_RATIO,
    double_threshold_grid,
    single_threshold_grid,
)

_BLOCK = 20_000  # thresholds per comparison block, to bound memory at N = 512


def _mean_over_models(predicate, values: np.ndarray, *thresholds: np.ndarray) -> np.ndarray:
    """Fraction of models for which predicate(value, *thresholds) holds, per threshold."""
    out = []
    for start in range(0, thresholds[0].size, _BLOCK):
        block = [t[None, start : start + _BLOCK] for t in thresholds]
        out.append(np.mean(predicate(values[:, None], *block), axis=0))
    return np.concatenate(out) if out else np.zeros(0)


def _single_threshold_rates(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR, FNR of "positive when value >= t" over a grid on [min, max] of all values."""
    all_values = np.concatenate([pos, neg])
    t = single_threshold_grid(all_values.min(), all_values.max())
    fpr = _mean_over_models(lambda c, t: c >= t, neg, t)
    fnr = _mean_over_models(lambda c, t: c < t, pos, t)
    return fpr, fnr


def _double_threshold_rates(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR, FNR of "positive when left <= value <= right", the narrower side positive."""
    pos_diff = pos.max() - pos.min()
    neg_diff = neg.max() - neg.min()
    width = neg_diff if pos_diff > neg_diff else pos_diff
    if pos_diff >= neg_diff:
        pos, neg = neg, pos
    right, left = double_threshold_grid(pos.min(), pos.max(), width)
    right = np.repeat(right, left.shape[1])  # one (left, right) pair per entry
    left = left.reshape(-1)

    def inside(c, lo, hi):
        return (lo <= c) & (c <= hi)

    fpr = _mean_over_models(inside, neg, left, right)
    fnr = _mean_over_models(lambda c, lo, hi: ~inside(c, lo, hi), pos, left, right)
    return fpr, fnr


def _threshold_epsilons(fpr: np.ndarray, fnr: np.ndarray, delta: float) -> np.ndarray:
    """Epsilon per threshold; inf for a perfect attack, NaN for a discarded threshold."""
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.clip(
            np.fmax(np.log(1 - delta - fpr) - np.log(fnr), np.log(1 - delta - fnr) - np.log(fpr)), 0, None
        )
    eps = np.where(fpr * fnr == 0, np.nan, eps)  # exactly one rate zero: too few samples
    return np.where(fpr + fnr == 0, np.inf, eps)  # both zero: perfect separation


def per_example_epsilons_reference(unlearned, retrained, delta: float = DELTA) -> np.ndarray:
    """Epsilon per example from confidences [N_models, n_examples], one example at a time."""
    unlearned = np.asarray(unlearned, dtype=np.float64)
    retrained = np.asarray(retrained, dtype=np.float64)
    retrain_is_positive = np.median(retrained, axis=0) > np.median(unlearned, axis=0)
    pos_confs = np.where(retrain_is_positive, retrained, unlearned)
    neg_confs = np.where(retrain_is_positive, unlearned, retrained)

    epsilons = []
    for i in range(pos_confs.shape[1]):
        pos, neg = pos_confs[:, i], neg_confs[:, i]
        pos_diff = pos.max() - pos.min()
        neg_diff = neg.max() - neg.min()
        with np.errstate(invalid="ignore"):
            ratio = min(pos_diff, neg_diff) / np.float64(max(pos_diff, neg_diff))  # 0/0 -> NaN
        if ratio < PEAKY_RANGE_RATIO:
            epsilons.append(EPSILON_CAP)
            continue
        fpr_d, fnr_d = _double_threshold_rates(pos, neg)
        fpr_s, fnr_s = _single_threshold_rates(pos, neg)
        eps = _threshold_epsilons(np.concatenate([fpr_d, fpr_s]), np.concatenate([fnr_d, fnr_s]), delta)
        kept = eps[~np.isnan(eps)]
        # The released code asserts here instead; see the module docstring of epsilon.py.
        epsilons.append(kept.max() if kept.size else 0.0)
    return np.clip(np.asarray(epsilons, dtype=np.float64), 0, EPSILON_CAP)
