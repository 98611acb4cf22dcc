"""How far apart two models are on a few samples, with the sampling noise of those few samples.

The deletion flow's gates compare a candidate with a reference (a retrained model, the champion)
on the forget set, which may be a handful of samples: a fixed gap on 8 samples fails a good
candidate by chance. Each gap here comes with a standard error, and a gate fails only when the
one-sided lower bound of the gap (`lower_bound`) is above its limit: the evidence says the gap is
too wide. `benchmarks/gate_error_rates.py` measures how often that fails a candidate whose true
gap is at the limit (at most 1 - confidence, by design) and how often it catches a wider one.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def paired_accuracy_gap(correct: np.ndarray, reference_correct: np.ndarray) -> tuple[float, float]:
    """|accuracy - reference accuracy| on the same samples, and its standard error (paired: the
    per-sample differences' standard deviation / sqrt(n))."""
    diff = np.asarray(correct, dtype=float) - np.asarray(reference_correct, dtype=float)
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError(f"need two equally long, non-empty 0/1 vectors; got differences of shape {diff.shape}")
    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else math.inf
    return abs(float(diff.mean())), se


def accuracy_gap(accuracy: float, n: int, reference: float, n_reference: int) -> tuple[float, float]:
    """|accuracy - reference| of two independent samples (sizes n, n_reference) and its standard error."""
    if n < 1 or n_reference < 1:
        raise ValueError(f"sample sizes must be >= 1, got {n} and {n_reference}")
    se = math.sqrt(accuracy * (1 - accuracy) / n + reference * (1 - reference) / n_reference)
    return abs(accuracy - reference), se


def loss_auc(forget_loss: np.ndarray, test_loss: np.ndarray) -> tuple[float, float]:
    """The loss attack's ROC AUC without training an attacker, the chance that a forget sample has
    a lower loss than a test sample (a member's loss is low; 1/2: forget samples look unseen), and
    its standard error by DeLong et al. (1988): the spread of each sample's placement among the
    other set's (infinite for a single forget sample: one sample shows nothing)."""
    forget_loss, test_loss = np.asarray(forget_loss, dtype=float), np.asarray(test_loss, dtype=float)
    if forget_loss.size == 0 or test_loss.size == 0:
        raise ValueError(f"need forget and test losses, got {forget_loss.size} and {test_loss.size}")
    below = (forget_loss[:, None] < test_loss[None, :]) + 0.5 * (forget_loss[:, None] == test_loss[None, :])
    auc = float(below.mean())
    if forget_loss.size < 2 or test_loss.size < 2:
        return auc, math.inf
    variance = below.mean(axis=1).var(ddof=1) / forget_loss.size + below.mean(axis=0).var(ddof=1) / test_loss.size
    return auc, float(math.sqrt(variance))


def lower_bound(gap: float, se: float, confidence: float, n: int) -> float:
    """One-sided lower bound of a gap at `confidence` (Student t with n - 1 degrees of freedom;
    no bound below 0). Never above the gap itself."""
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    if not math.isfinite(se) or n < 2:
        return 0.0
    return max(0.0, gap - float(stats.t.ppf(confidence, n - 1)) * se)
