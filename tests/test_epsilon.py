"""Tests of the competition epsilon metric (spec: docs/metric.md, section 1)."""

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unlearnops.metrics import epsilon as E
from unlearnops.metrics.epsilon_reference import per_example_epsilons_reference

DELTA = 1e-5


def both_epsilons(u, r):
    """Fast and reference epsilons, checked to agree to 1e-6 per example."""
    fast = E.per_example_epsilons(u, r)
    ref = per_example_epsilons_reference(u, r)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-6)
    return fast


# ---------------------------------------------------------------- logit-scaled confidence


def test_confidence_hand_values():
    # [ln 3, 0, 0], label 0: p = (3/5, 1/5, 1/5) -> log(3/5) - log(2/5) = ln 1.5.
    # [0, 0, 5], label 2: p_2 = e^5 / (2 + e^5), wrong mass 2 / (2 + e^5) -> 5 - ln 2.
    logits = np.array([[np.log(3.0), 0.0, 0.0], [0.0, 0.0, 5.0]])
    labels = np.array([0, 2])
    conf = E.logit_scaled_confidence(logits, labels)
    np.testing.assert_allclose(conf, [np.log(1.5), 5.0 - np.log(2.0)], atol=1e-12)


def test_confidence_saturated_logits_stay_finite():
    # exp(-1000) underflows to 0; the 1e-45 inside the log bounds the result at -ln(1e-45).
    conf = E.logit_scaled_confidence(np.array([[1000.0, 0.0], [1000.0, 0.0]]), np.array([0, 1]))
    bound = -np.log(1e-45)
    np.testing.assert_allclose(conf, [bound, -bound], rtol=1e-12)


def test_confidence_leading_dims_match_per_model():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 4)) * 4
    labels = rng.integers(0, 4, 5)
    stacked = E.logit_scaled_confidence(logits, labels)
    assert stacked.shape == (3, 5)
    for m in range(3):
        p = np.exp(logits[m]) / np.exp(logits[m]).sum(axis=1, keepdims=True)
        p_y = p[np.arange(5), labels]
        np.testing.assert_allclose(stacked[m], np.log(p_y) - np.log(1 - p_y), rtol=1e-9)


@pytest.mark.parametrize(
    "labels, message",
    [(np.array([0, 3]), "out of range"), (np.array([0, -1]), "out of range"), (np.array([0]), "entries"),
     (np.array([0.0, 1.0]), "integers"), (np.array([[0, 1]]), "1-D")],
)
def test_confidence_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        E.logit_scaled_confidence(np.zeros((2, 3)), labels)


# ---------------------------------------------------------------- hand-worked epsilons


def test_identical_two_models_is_zero():
    # U = R = [0, 1]: equal medians -> U positive. Single threshold t in (0, 1]: FPR = FNR = 1/2,
    # eps = log(1 - 1e-5 - 1/2) - log(1/2) < 0 -> 0; t = 0 has FNR = 0, FPR = 1 -> discarded.
    # Intervals see the same values on both sides, so FPR = 1 - FNR and eps <= 0 too.
    assert both_epsilons([[0.0], [1.0]], [[0.0], [1.0]])[0] == 0.0


def test_separated_is_capped():
    # R = [10, 11] above U = [0, 1]: any t in (1, 10] has FPR = FNR = 0 -> inf -> capped at 50.
    assert both_epsilons([[0.0], [1.0]], [[10.0], [11.0]])[0] == 50.0


def test_four_models_by_hand():
    # U = [0, 1, 2, 3], R = [2.5, 3.5, 4.5, 5.5]; R has the larger median -> positive.
    # Single: t in (2.5, 3] gives FNR = 1/4 (2.5 < t) and FPR = 1/4 (3 >= t). Lower FNR
    # needs t <= 2.5 (then FPR >= 1/4 with FNR = 0: discarded); lower FPR needs t > 3 (FNR >= 1/4,
    # FPR = 0: discarded). Intervals around U cannot do better: keeping 3 in means 2.5 is in.
    # eps(1/4, 1/4) = log(1 - 1e-5 - 1/4) - log(1/4) = ln(2.99996) beats eps(1/4, 1/2) = ln(1.99996).
    u = np.array([[0.0], [1.0], [2.0], [3.0]])
    r = np.array([[2.5], [3.5], [4.5], [5.5]])
    expected = np.log(0.75 - DELTA) - np.log(0.25)
    assert both_epsilons(u, r)[0] == pytest.approx(expected, abs=1e-12)


def test_identical_samples_are_zero_at_512_models():
    # U == R exactly: for every threshold FPR = 1 - FNR, so each eps is log((1 - 1e-5 - FPR) / (1 - FPR)) < 0.
    u = np.random.default_rng(3).normal(size=(512, 5))
    assert np.array_equal(E.per_example_epsilons(u, u.copy()), np.zeros(5))


def test_epsilon_grows_with_separation():
    # Independent draws from one distribution are not scored 0: the best of ~160k thresholds
    # finds tail noise (e.g. FPR = 1/512, FNR = 507/512 gives ln(4.995) = 1.61). The metric
    # still orders shifts: more separation, larger epsilon, lower F.
    rng = np.random.default_rng(3)
    r = rng.normal(size=(512, 30))
    medians, qualities = [], []
    for shift in (0.0, 1.0, 2.0):
        eps = E.per_example_epsilons(rng.normal(shift, 1, size=(512, 30)), r)
        medians.append(np.median(eps))
        qualities.append(E.forget_quality(eps, 512)["forget_quality"])
    assert medians[0] < 2.0 < medians[1] < medians[2] < 50
    assert qualities[0] > qualities[1] > qualities[2]


def test_range_ratio_rule():
    # R spans [0, 1] with 3 of its 8 values inside [0.5, 0.52], so no attack separates U from
    # R perfectly. U constant: ratio 0 < 0.01 -> 50; U range 0.005: ratio 0.005 -> 50;
    # U range 0.02: ratio 0.02, above the rule, so it scores by attack (below the cap).
    r = np.array([0.0, 0.505, 0.51, 0.515, 0.2, 0.8, 1.0, 0.3])[:, None]
    peaky = np.full((8, 1), 0.51)
    slightly = 0.5 + np.linspace(0.0, 0.005, 8)[:, None]
    wider = 0.5 + np.linspace(0.0, 0.02, 8)[:, None]
    eps = both_epsilons(np.hstack([peaky, slightly, wider]), np.hstack([r, r, r]))
    assert eps[0] == 50.0 and eps[1] == 50.0 and eps[2] < 50.0


def test_both_constant():
    # Both ranges 0: 0/0 does not trigger the ratio rule (NaN < 0.01 is false, as released).
    # Different constants separate perfectly -> 50; equal constants leave no kept threshold,
    # where the released code asserts and this module returns 0.
    eps = both_epsilons(np.array([[1.0, 1.0]] * 3), np.array([[2.0, 1.0]] * 3))
    assert list(eps) == [50.0, 0.0]


# ---------------------------------------------------------------- fast == reference


def test_vectorised_linspace_matches_one_call_per_row():
    right, left = E.double_threshold_grid(-0.37, 1.91, 2.28)
    for i in range(0, right.size, 37):
        row = np.linspace(right[i] - 2.28 - 2.0, right[i] - 2.28 + 2.0, 400)
        assert np.array_equal(left[i], row)


values = st.one_of(
    st.integers(-30, 30).map(lambda k: k / 10),  # coarse: ties within and across U and R, grid hits
    st.floats(-4, 4, allow_nan=False, width=32),
)


@st.composite
def confidence_pairs(draw):
    n_models = draw(st.integers(2, 12))
    n_examples = draw(st.integers(1, 3))
    shape = (n_models, n_examples)
    u = np.array(draw(st.lists(values, min_size=n_models * n_examples, max_size=n_models * n_examples))).reshape(shape)
    r = np.array(draw(st.lists(values, min_size=n_models * n_examples, max_size=n_models * n_examples))).reshape(shape)
    if draw(st.booleans()):  # share some models' values exactly between U and R
        k = draw(st.integers(1, n_models))
        r[:k] = u[:k]
    return u + draw(st.sampled_from([0.0, 7.3])), r


@settings(max_examples=80, deadline=None)
@given(confidence_pairs())
def test_fast_equals_reference_hypothesis(pair):
    both_epsilons(*pair)


def test_fast_equals_reference_seeded():
    rng = np.random.default_rng(7)
    for _ in range(25):
        n_models = int(rng.integers(2, 64))
        u = rng.normal(rng.normal(0, 1.5), rng.uniform(0.05, 3), (n_models, 3))
        r = rng.normal(0, rng.uniform(0.05, 3), (n_models, 3))
        u[:, 0] = np.round(u[:, 0], 2)  # on the 0.01 grid of thresholds
        r[:, 0] = np.round(r[:, 0], 2)
        r[rng.integers(0, n_models, n_models // 3), 1] = u[0, 1]  # duplicates across sides
        both_epsilons(u, r)


# ---------------------------------------------------------------- scores


def test_bins_for_512_models_follow_released_code():
    edges, points = E.score_bins(512)  # ceil(ln 511) = 7 -> 14 bins, not the write-up's 13
    np.testing.assert_array_equal(edges, np.arange(15) * 0.5)
    np.testing.assert_array_equal(points, 2.0 / 2.0 ** np.arange(1, 15))


def test_bins_small_n():
    assert E.score_bins(2)[1].size == 0  # ceil(ln 1) = 0: no bins, every example scores 0
    assert E.score_bins(3)[1].tolist() == [1.0, 0.5]  # ceil(ln 2) = 1
    assert E.score_bins(4)[1].tolist() == [1.0, 0.5, 0.25, 0.125]  # ceil(ln 3) = 2


def test_forget_quality_points():
    eps = [0.0, 0.49, 0.5, 6.99, 7.0, 50.0]
    result = E.forget_quality(eps, 512)
    expected_points = [1.0, 1.0, 0.5, 2.0 ** -13, 0.0, 0.0]
    np.testing.assert_array_equal(result["per_example_points"], expected_points)
    assert result["forget_quality"] == pytest.approx(sum(expected_points) / 6)
    assert E.forget_quality([0.0, 0.1], 2)["forget_quality"] == 0.0


def test_final_score_arithmetic_not_capped():
    # 0.5 * (0.9 / 1.0) * (0.8 / 0.5): the test ratio 1.6 > 1 stays uncapped.
    assert E.final_score(0.5, [0.8, 1.0], 1.0, 0.8, [0.4, 0.6]) == pytest.approx(0.5 * 0.9 * 1.6)
    with pytest.raises(ValueError, match="positive"):
        E.final_score(0.5, 1.0, 0.0, 1.0, 1.0)


def _method_inputs(rng, n_models, n_examples, shift, acc=0.9):
    u = rng.normal(shift, 1, (n_models, n_examples))
    r = rng.normal(0, 1, (n_models, n_examples))
    accs = {k: rng.uniform(acc - 0.02, acc + 0.02, n_models) for k in E.ACCURACY_KEYS}
    return u, r, accs


def test_intervals_hold_their_estimates_and_shrink_with_more_examples():
    rng = np.random.default_rng(11)
    results = {}
    for n_examples in (16, 256):
        u, r, accs = _method_inputs(rng, 16, n_examples, shift=1.0)
        eps = E.per_example_epsilons(u, r)
        results[n_examples] = E.scores_with_intervals(eps, 16, accs)
        F = E.forget_quality(eps, 16)["forget_quality"]
        assert results[n_examples]["forget_quality"]["estimate"] == F  # the plain score, not a resampled one
        assert results[n_examples]["final_score"]["estimate"] == E.final_score(F, *(accs[k] for k in E.ACCURACY_KEYS))
        for key in ("forget_quality", "final_score"):
            s = results[n_examples][key]
            assert s["low"] < s["estimate"] < s["high"]
    # 16x the examples: about a quarter of the width (the interval is over forget examples).
    width = {n: r["forget_quality"]["high"] - r["forget_quality"]["low"] for n, r in results.items()}
    assert 0.15 < width[256] / width[16] < 0.4
    assert results[256]["interval"]["n_examples"] == 256 and results[256]["interval"]["n_models"] == 16


def test_final_interval_is_the_f_interval_times_the_accuracy_ratios():
    u = np.random.default_rng(1).normal(size=(8, 40))
    r = np.random.default_rng(2).normal(0.5, 1, size=(8, 40))
    accs = {k: np.linspace(0.5, 1.0, 8) for k in E.ACCURACY_KEYS}
    accs["test_unlearned"] = accs["test_unlearned"] * 0.8  # test ratio 0.8, retain ratio 1
    result = E.scores_with_intervals(E.per_example_epsilons(u, r), 8, accs)
    for side in ("estimate", "low", "high"):
        assert result["final_score"][side] == pytest.approx(0.8 * result["forget_quality"][side], rel=1e-12)
    with pytest.raises(ValueError, match="one accuracy per model"):
        E.scores_with_intervals(np.zeros(40), 8, {**accs, "test_retrained": np.ones(7)})
    with pytest.raises(ValueError, match="NaN or inf"):
        E.scores_with_intervals(np.zeros(40), 8, {**accs, "test_retrained": np.full(8, np.nan)})


def test_ranking_stability_table():
    rng = np.random.default_rng(2)
    methods = {
        "good": _method_inputs(rng, 16, 6, shift=0.0),
        "medium": _method_inputs(rng, 16, 6, shift=1.0),
        "bad": _method_inputs(rng, 16, 6, shift=4.0),
    }
    table = E.ranking_stability(methods, seed=0)
    assert list(table.columns) == ["method", "fraction", "n_models", "forget_quality", "final_score", "rank"]
    assert len(table) == 12 and sorted(table["n_models"].unique()) == [2, 4, 8, 16]
    for _, group in table.groupby("n_models"):
        assert sorted(group["method"]) == ["bad", "good", "medium"]
        assert group["rank"].min() == 1 and (group.sort_values("rank")["final_score"].diff().dropna() <= 0).all()
    full = table[table["n_models"] == 16].set_index("method")
    u, r, accs = methods["bad"]  # all 16 models: the order drawn does not matter
    F = E.forget_quality(E.per_example_epsilons(u, r), 16)["forget_quality"]
    expected = E.final_score(F, *(accs[k] for k in E.ACCURACY_KEYS))
    assert full.loc["bad", "final_score"] == pytest.approx(expected)
    assert full.loc["good", "rank"] == 1
    pd.testing.assert_frame_equal(table, E.ranking_stability(methods, seed=0))


# ---------------------------------------------------------------- files


def _save(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


def test_score_files_round_trip_confidences(tmp_path):
    rng = np.random.default_rng(4)
    u, r = rng.normal(0.5, 1, (8, 5)), rng.normal(0, 1, (8, 5))
    out = tmp_path / "sub" / "scores.json"
    result = E.score_files(_save(tmp_path, "u.npy", u), _save(tmp_path, "r.npy", r), out)
    written = json.loads(out.read_text())
    assert written == result
    np.testing.assert_allclose(written["epsilons"], E.per_example_epsilons(u, r))
    assert written["n_models"] == 8 and written["n_examples"] == 5
    assert written["bins"]["edges"] == [0.0, 0.5, 1.0, 1.5, 2.0]  # ceil(ln 7) = 2
    assert written["forget_quality"] == pytest.approx(E.forget_quality(written["epsilons"], 8)["forget_quality"])
    assert [p.name for p in out.parent.iterdir()] == ["scores.json"]  # no temp file left


def test_score_files_logits(tmp_path):
    rng = np.random.default_rng(5)
    u, r = rng.normal(size=(6, 4, 3)), rng.normal(size=(6, 4, 3))
    labels = np.array([0, 2, 1, 2])
    result = E.score_files(
        _save(tmp_path, "u.npy", u), _save(tmp_path, "r.npy", r), tmp_path / "s.json",
        labels_path=_save(tmp_path, "y.npy", labels), logits=True,
    )
    expected = E.per_example_epsilons(E.logit_scaled_confidence(u, labels), E.logit_scaled_confidence(r, labels))
    np.testing.assert_allclose(result["epsilons"], expected)


GOOD = np.arange(12.0).reshape(4, 3) / 10


@pytest.mark.parametrize(
    "u, r, message",
    [
        (GOOD, GOOD[:, :2], "same shape"),
        (GOOD, GOOD[:3], "same shape"),
        (np.where(GOOD == 0.5, np.nan, GOOD), GOOD, "NaN or inf"),
        (GOOD, np.where(GOOD == 0.5, np.inf, GOOD), "NaN or inf"),
        (GOOD[:1], GOOD[:1], "at least 2 models"),
        (GOOD[:, :0], GOOD[:, :0], "empty"),
        (GOOD[0], GOOD[0], "2-D"),
        (GOOD, GOOD * 1e4, "spans"),
    ],
)
def test_score_files_bad_input_leaves_output_untouched(tmp_path, u, r, message):
    out = tmp_path / "scores.json"
    out.write_text("previous result")
    with pytest.raises(ValueError, match=message):
        E.score_files(_save(tmp_path, "u.npy", u), _save(tmp_path, "r.npy", r), out)
    assert out.read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.npy", "scores.json", "u.npy"]


@pytest.mark.parametrize(
    "labels, logits_shape, message",
    [
        (np.array([0, 1, 5]), (4, 3, 3), "out of range"),
        (np.array([0, 1]), (4, 3, 3), "entries"),
        (np.array([0, 1, 2]), (4, 3), "3-D"),
    ],
)
def test_score_files_bad_logits(tmp_path, labels, logits_shape, message):
    logits = np.random.default_rng(0).normal(size=logits_shape)
    out = tmp_path / "scores.json"
    with pytest.raises(ValueError, match=message):
        E.score_files(_save(tmp_path, "u.npy", logits), _save(tmp_path, "r.npy", logits), out,
                      labels_path=_save(tmp_path, "y.npy", labels), logits=True)
    assert not out.exists()


def test_score_files_missing_labels_and_unreadable_file(tmp_path):
    u = _save(tmp_path, "u.npy", GOOD)
    with pytest.raises(ValueError, match="labels_path"):
        E.score_files(u, u, tmp_path / "s.json", logits=True)
    (tmp_path / "bad.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="cannot read"):
        E.score_files(tmp_path / "bad.npy", u, tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_write_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "scores.json"
    out.write_text("previous result")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(E.os, "replace", broken_replace)
    with pytest.raises(OSError):
        E.score_files(_save(tmp_path, "u.npy", GOOD), _save(tmp_path, "r.npy", GOOD + 1), out)
    assert out.read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.npy", "scores.json", "u.npy"]


def test_n_models_must_match_in_epsilons():
    with pytest.raises(ValueError, match="equal N"):
        E.per_example_epsilons(np.zeros((4, 2)), np.zeros((5, 2)))
