"""Tests of the membership-inference attacks and agreement metrics (docs/metric.md, section 2)."""

import numpy as np
import pytest

from unlearnops.metrics.agreement import accuracy_gaps, js_divergence_per_example
from unlearnops.metrics.mia import loss_mia, mia_efficacy, mia_over_models

N_CLASSES = 10


def synthetic_logits(rng, n, margin, n_models=None):
    """Logits whose true class leads by about `margin`: a larger margin means a lower loss."""
    shape = (n, N_CLASSES) if n_models is None else (n_models, n, N_CLASSES)
    labels = rng.integers(0, N_CLASSES, n)
    logits = rng.normal(0, 1, shape)
    logits[..., np.arange(n), labels] += margin + rng.normal(0, 1, shape[:-1])
    return logits, labels


def test_loss_mia_detects_memorised_forget_set():
    rng = np.random.default_rng(0)
    forget = synthetic_logits(rng, 300, margin=8.0)  # memorised: very low loss
    test = synthetic_logits(rng, 500, margin=1.0)
    result = loss_mia(*forget, *test, seed=0)
    assert result["acc"] > 0.9 and result["auc"] > 0.95


def test_loss_mia_near_chance_for_same_distribution():
    rng = np.random.default_rng(1)
    forget = synthetic_logits(rng, 600, margin=2.0)
    test = synthetic_logits(rng, 600, margin=2.0)
    result = loss_mia(*forget, *test, seed=0)
    assert abs(result["acc"] - 0.5) < 0.06 and abs(result["auc"] - 0.5) < 0.06


def test_loss_mia_is_seeded_and_checks_split_count():
    rng = np.random.default_rng(2)
    forget, test = synthetic_logits(rng, 40, 3.0), synthetic_logits(rng, 90, 1.0)
    assert loss_mia(*forget, *test, seed=3) == loss_mia(*forget, *test, seed=3)
    with pytest.raises(ValueError, match="n_splits"):
        loss_mia(*forget, *test, n_splits=50)


@pytest.mark.parametrize("feature", ["confidence", "entropy"])
def test_mia_efficacy(feature):
    rng = np.random.default_rng(3)
    retain = synthetic_logits(rng, 800, margin=7.0)  # members: confident
    test = synthetic_logits(rng, 400, margin=1.0)  # non-members
    remembered = synthetic_logits(rng, 200, margin=7.0)  # forget set still looks like retain
    forgotten = synthetic_logits(rng, 200, margin=1.0)  # forget set looks like unseen data
    kept = mia_efficacy(*retain, *test, *remembered, feature=feature)
    gone = mia_efficacy(*retain, *test, *forgotten, feature=feature)
    assert kept["efficacy"] < 0.1 < 0.9 < gone["efficacy"]
    assert kept["efficacy"] + kept["member_rate"] == pytest.approx(1.0)


def test_mia_efficacy_rejects_unknown_feature():
    rng = np.random.default_rng(4)
    data = synthetic_logits(rng, 20, 1.0)
    with pytest.raises(ValueError, match="unknown feature"):
        mia_efficacy(*data, *data, *data, feature="margin")


def test_mia_over_models_matches_per_model_calls():
    rng = np.random.default_rng(5)
    forget = synthetic_logits(rng, 60, 4.0, n_models=3)
    test = synthetic_logits(rng, 80, 1.0, n_models=3)
    retain = synthetic_logits(rng, 100, 4.0, n_models=3)
    stacks = dict(forget_logits=forget[0], forget_labels=forget[1], test_logits=test[0], test_labels=test[1])

    loss = mia_over_models("loss", **stacks, n_splits=5, seed=1)
    per_model = [loss_mia(forget[0][m], forget[1], test[0][m], test[1], n_splits=5, seed=1)["acc"] for m in range(3)]
    assert loss["acc"]["per_model"] == pytest.approx(per_model)
    assert loss["acc"]["mean"] == pytest.approx(np.mean(per_model))
    assert loss["acc"]["std"] == pytest.approx(np.std(per_model))

    eff = mia_over_models("efficacy", **stacks, retain_logits=retain[0], retain_labels=retain[1], seed=1)
    per_model = [mia_efficacy(retain[0][m], retain[1], test[0][m], test[1], forget[0][m], forget[1], seed=1)["efficacy"]
                 for m in range(3)]
    assert eff["efficacy"]["per_model"] == pytest.approx(per_model)

    with pytest.raises(ValueError, match="retain_logits"):
        mia_over_models("efficacy", **stacks)
    with pytest.raises(ValueError, match="unknown attack"):
        mia_over_models("lira", **stacks)


def test_bad_logits_rejected():
    rng = np.random.default_rng(6)
    logits, labels = synthetic_logits(rng, 30, 1.0)
    bad = logits.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        loss_mia(bad, labels, logits, labels)
    with pytest.raises(ValueError, match="out of range"):
        loss_mia(logits, labels + N_CLASSES, logits, labels)


# ---------------------------------------------------------------- agreement


def test_accuracy_gaps_hand_case():
    # |0.80 - 0.75| = 0.05, |0.95 - 0.97| = 0.02, |mean(0.6, 0.7) - 0.6| = 0.05 -> average 0.04.
    result = accuracy_gaps({"forget": 0.80, "retain": 0.95, "test": [0.6, 0.7]}, {"forget": 0.75, "retain": 0.97, "test": 0.6})
    assert result["gaps"] == pytest.approx({"forget": 0.05, "retain": 0.02, "test": 0.05})
    assert result["average_gap"] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="splits differ"):
        accuracy_gaps({"forget": 1.0}, {"test": 1.0})


def test_js_divergence_hand_cases():
    # Example 0: identical samples -> 0. Example 1: U at 0, R at 1, nothing shared -> 1 bit.
    # Example 2, 2 bins on [0, 1]: U all in bin 0, R half and half: p = (1, 0), q = (1/2, 1/2),
    # m = (3/4, 1/4); JS = 1/2 KL(p||m) + 1/2 KL(q||m) = 1/2 log2(4/3) + 1/4 log2(2/3) + 1/4 log2(2).
    u = np.array([[0.3, 0.0, 0.0], [0.7, 0.0, 0.2]])
    r = np.array([[0.3, 1.0, 0.0], [0.7, 1.0, 1.0]])
    expected = 0.5 * np.log2(4 / 3) + 0.25 * np.log2(2 / 3) + 0.25
    js = js_divergence_per_example(u, r, bins=2)
    np.testing.assert_allclose(js, [0.0, 1.0, expected], atol=1e-12)


def test_js_divergence_constant_example_and_errors():
    assert js_divergence_per_example(np.ones((3, 1)), np.ones((5, 1)))[0] == 0.0
    with pytest.raises(ValueError, match="n_examples"):
        js_divergence_per_example(np.ones((3, 2)), np.ones((3, 1)))
