"""The F and Final intervals (epsilon.mean_interval, epsilon.scores_with_intervals): they hold their
estimate on any input, degenerate ones included, and cover the population F as often as stated."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import special, stats

from unlearnops import evaluation
from unlearnops.config import load_params
from unlearnops.metrics import epsilon as E
from unlearnops.outputs import RunOutputs

LEVEL = load_params()["evaluate"]["interval_level"]  # params.yaml's default
BIN_POINTS = [0.0, *E.score_bins(32)[1]]  # the values a per-example point takes at N = 32


def assert_holds(score: dict) -> None:
    assert np.isfinite([score["low"], score["estimate"], score["high"]]).all()
    assert score["low"] <= score["estimate"] <= score["high"]


# ---------------------------------------------------------------- mean_interval


def test_mean_interval_is_the_logit_t_interval_by_hand():
    points = np.array([1.0, 0.5, 0.5, 0.25])  # mean 0.5625, s = 0.3146
    m, s = points.mean(), points.std(ddof=1)
    half = stats.t.ppf(0.975, 3) * s / 2 / (m * (1 - m))
    low, high = E.mean_interval(points, 0.95)
    assert low == pytest.approx(special.expit(special.logit(m) - half), rel=1e-12)
    assert high == pytest.approx(special.expit(special.logit(m) + half), rel=1e-12)
    # Small means: the interval reaches further up than down (right-skewed points).
    low, high = E.mean_interval([0.0, 0.0, 0.0, 1 / 64, 1 / 32, 1 / 8], 0.95)
    assert high - 0.0286 > 2 * (0.0286 - low)


def test_mean_interval_degenerate_samples():
    assert E.mean_interval([0.25], LEVEL) == (0.0, 1.0)  # one example: no spread to estimate
    assert E.mean_interval(np.zeros(30), LEVEL) == (0.0, 0.0)  # all-zero F
    assert E.mean_interval(np.ones(5), LEVEL) == (1.0, 1.0)
    assert E.mean_interval(np.full(7, 0.125), LEVEL) == (0.125, 0.125)


def test_mean_interval_widens_with_the_level():
    points = np.random.default_rng(0).choice(BIN_POINTS, 25)
    widths = [high - low for low, high in (E.mean_interval(points, level) for level in (0.5, 0.9, 0.95, 0.99))]
    assert all(a < b for a, b in zip(widths, widths[1:]))


@pytest.mark.parametrize(
    "values, level, message",
    [([], 0.95, "non-empty"), ([[0.5]], 0.95, "1-D"), ([0.5, 1.5], 0.95, r"\[0, 1\]"), ([0.5, np.nan], 0.95, r"\[0, 1\]"),
     ([0.5, 0.1], 1.0, "level"), ([0.5, 0.1], 0.0, "level")],
)
def test_mean_interval_bad_input(values, level, message):
    with pytest.raises(ValueError, match=message):
        E.mean_interval(values, level)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(BIN_POINTS), st.floats(0, 1)), min_size=1, max_size=80),
    st.floats(0.01, 0.999),
)
# Values one ulp apart: both back-transformed ends land an ulp below the mean (fixed by min/max).
@example([0.04097352393619469, 0.040973523936194696] * 3, 0.95)
@example([0.12428327649956394, 0.12428327649956396] * 3, 0.95)
def test_mean_interval_always_holds_its_mean(values, level):
    low, high = E.mean_interval(values, level)
    mean = float(np.mean(values))
    assert np.isfinite([low, high]).all()
    assert 0.0 <= low <= mean <= high <= 1.0


def test_coverage_of_skewed_points_at_100_examples():
    # Points drawn from a fixed, right-skewed distribution (the `separated` population of
    # benchmarks/interval_coverage.py: mean 0.04); the interval must hold the true mean in
    # about 95% of 4,000 forget sets (benchmark: 93-95% at 100 examples).
    values = np.array([0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4])
    probs = np.array([17, 375, 312, 216, 68, 12]) / 1000
    truth = values @ probs
    rng = np.random.default_rng(0)
    hits = [low <= truth <= high for low, high in (E.mean_interval(rng.choice(values, 100, p=probs), 0.95) for _ in range(4000))]
    assert 0.92 <= np.mean(hits) <= 0.97


# ---------------------------------------------------------------- scores_with_intervals on confidences


def _accuracies(n_models, rng):
    return {k: rng.uniform(0.8, 1.0, n_models) for k in E.ACCURACY_KEYS}


def _scored(u, r, seed=0):
    u, r = np.asarray(u, dtype=float), np.asarray(r, dtype=float)
    accs = _accuracies(u.shape[0], np.random.default_rng(seed))
    eps = E.per_example_epsilons(u, r, workers=1)
    result = E.scores_with_intervals(eps, u.shape[0], accs, LEVEL)
    assert_holds(result["forget_quality"])
    assert_holds(result["final_score"])
    # The estimates are the plain scores, not resampled ones.
    F = E.forget_quality(eps, u.shape[0])["forget_quality"]
    assert result["forget_quality"]["estimate"] == F
    assert result["final_score"]["estimate"] == E.final_score(F, *(accs[k] for k in E.ACCURACY_KEYS))
    return result


SATURATED = E.logit_scaled_confidence(np.array([[[1e4, 0.0]] * 3] * 8), np.zeros(3, dtype=int))  # +103.6 everywhere


@pytest.mark.parametrize(
    "name, u, r, expected_F",
    [
        ("all-zero F: every example separated", np.zeros((8, 20)) + np.arange(8)[:, None], np.full((8, 20), 100.0), 0.0),
        ("identical models on both sides", np.ones((8, 20)), np.ones((8, 20)), 1.0),
        ("all-identical confidences per side", np.full((8, 20), 2.0), np.full((8, 20), 3.0), 0.0),
        ("saturated softmax, equal on both sides", SATURATED, SATURATED.copy(), 1.0),
        ("saturated vs unsure", SATURATED, np.zeros_like(SATURATED), 0.0),
    ],
)
def test_degenerate_inputs_give_a_zero_width_interval_at_the_estimate(name, u, r, expected_F):
    result = _scored(u, r)
    assert result["forget_quality"] == {"estimate": expected_F, "low": expected_F, "high": expected_F}


def test_one_forget_example_spans_the_whole_range():
    rng = np.random.default_rng(1)
    result = _scored(rng.normal(size=(16, 1)), rng.normal(size=(16, 1)))
    assert (result["forget_quality"]["low"], result["forget_quality"]["high"]) == (0.0, 1.0)


def test_two_models_score_zero_with_no_bins():
    result = _scored([[0.0, 1.0], [1.0, 0.0]], [[0.5, 0.2], [0.1, 0.9]])  # N = 2: no bins
    assert result["final_score"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}


confidence = st.one_of(st.sampled_from([0.0, 1.0, -103.6, 103.6]), st.floats(-5, 5, allow_nan=False, width=32))


@st.composite
def confidence_sets(draw):
    n_models, n_examples = draw(st.integers(2, 10)), draw(st.integers(1, 6))
    cells = n_models * n_examples
    u = np.array(draw(st.lists(confidence, min_size=cells, max_size=cells))).reshape(n_models, n_examples)
    r = np.array(draw(st.lists(confidence, min_size=cells, max_size=cells))).reshape(n_models, n_examples)
    if draw(st.booleans()):  # identical models: every row the same
        u = np.repeat(u[:1], n_models, axis=0)
    if draw(st.booleans()):
        r = u.copy()
    return u, r


@settings(max_examples=100, deadline=None)
@given(confidence_sets(), st.integers(0, 3))
def test_scores_hold_their_estimates_on_any_confidences(pair, seed):
    _scored(*pair, seed=seed)


# ---------------------------------------------------------------- evaluation


def _run(confidences_sign: float, n_models: int, n_forget: int, seed: int) -> RunOutputs:
    """Two-class logits whose forget confidences are normal around `confidences_sign`."""
    rng = np.random.default_rng(seed)
    splits = {"retain": 50, "forget": n_forget, "test": 40}
    logits, labels, ids = {}, {}, {}
    for split, size in splits.items():
        margin = rng.normal(confidences_sign if split == "forget" else 2.0, 1.0, (n_models, size))
        logits[split] = np.stack([margin, np.zeros_like(margin)], axis=-1)
        labels[split], ids[split] = np.zeros(size, dtype=int), np.arange(size)
    return RunOutputs(logits, labels, ids, np.ones(n_models), 1.0)


def test_competition_score_and_noise_floor_intervals_hold():
    params = load_params()
    cfg = evaluation.eval_config(params)
    retrained = _run(0.0, 16, 30, seed=0)
    score, epsilons = evaluation.competition_score(_run(1.5, 16, 30, seed=1), retrained, cfg)
    assert epsilons.shape == (30,)
    assert score["interval"]["n_models"] == 16 and score["interval"]["n_examples"] == 30
    assert score["interval"]["level"] == cfg.interval_level
    for key in ("forget_quality", "final_score"):
        assert_holds(score[key])
        assert score[key]["low"] < score[key]["high"]
    floor = evaluation.retrain_noise_floor(retrained, params)
    assert floor["interval"]["n_models"] == 8  # half against half
    for key in ("forget_quality", "final_score"):
        assert_holds(floor[key])
