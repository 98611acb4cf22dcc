"""The deletion gates' statistics (unlearnops/metrics/gaps.py)."""
from __future__ import annotations

import numpy as np
import pytest

from unlearnops.metrics.gaps import accuracy_gap, loss_auc, lower_bound, paired_accuracy_gap


def test_loss_auc_is_the_chance_a_forget_loss_is_below_a_test_loss():
    assert loss_auc([0.1, 0.2], [1.0, 2.0, 3.0]) == (1.0, 0.0)   # every forget sample looks like a member
    assert loss_auc([5.0, 6.0], [1.0, 2.0])[0] == 0.0
    assert loss_auc([1.0, 3.0], [2.0, 2.0])[0] == 0.5
    assert loss_auc([1.0], [2.0, 3.0])[1] == float("inf")  # one forget sample: no spread to measure
    with pytest.raises(ValueError, match="need forget and test losses"):
        loss_auc([], [1.0])


@pytest.mark.parametrize("n_forget", [8, 36])
def test_the_auc_standard_error_matches_the_spread_of_simulated_aucs(n_forget):
    rng = np.random.default_rng(0)
    n_test, scale = 360, 1 / 3  # exponential losses: true AUC 1 / (1 + scale) = 0.75
    measured = [loss_auc(rng.exponential(scale, n_forget), rng.exponential(1.0, n_test)) for _ in range(2000)]
    aucs, ses = np.array(measured).T
    assert aucs.mean() == pytest.approx(0.75, abs=0.01)
    assert np.sqrt(np.mean(ses**2)) == pytest.approx(aucs.std(), rel=0.1)


def test_gaps_and_their_bounds():
    assert paired_accuracy_gap([1, 1, 0, 0], [1, 1, 1, 1]) == pytest.approx((0.5, 0.2886751), rel=1e-6)
    gap, se = accuracy_gap(0.9, 100, 0.8, 400)
    assert gap == pytest.approx(0.1) and se == pytest.approx(np.sqrt(0.09 / 100 + 0.16 / 400))
    assert lower_bound(0.5, 0.1, 0.95, 10) == pytest.approx(0.5 - 1.8331129 * 0.1, rel=1e-6)
    assert lower_bound(0.1, 0.5, 0.95, 10) == 0.0   # never below 0
    assert lower_bound(0.3, 0.0, 0.95, 10) == 0.3   # no spread: the gap itself
    assert lower_bound(1.0, float("inf"), 0.95, 1) == 0.0   # one sample shows nothing
    with pytest.raises(ValueError, match="confidence"):
        lower_bound(0.1, 0.1, 1.0, 10)
