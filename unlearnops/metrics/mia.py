"""Population membership-inference attacks from stored logits (spec: docs/metric.md, section 2).

- `loss_mia`: the competition starting kit's attack (also SCRUB's): logistic regression on
  the per-sample cross-entropy loss, forget (1) vs test (0), class-balanced, cross-validated.
  Ideal for an unlearned model: about 0.5, or the retrained model's value.
- `mia_efficacy`: SalUn's MIA-efficacy (MUSO reports its complement): an attacker fit on
  retain (member) vs test (non-member) is applied to the forget set; efficacy is the
  fraction of forget examples predicted non-member.

Per-model functions take one model's logits [n, C]; `mia_over_models` takes stacks
[N_models, n, C], computes the features for the whole stack at once and reports the mean
and standard deviation over models.

The attacker is StandardScaler + LogisticRegression: on one feature this is a threshold rule
like the starting kit's plain logistic regression, but it converges whatever the feature's
scale. The starting kit splits with StratifiedShuffleSplit; this module uses shuffled
StratifiedKFold, so every balanced example is tested exactly once.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from unlearnops.metrics.epsilon import _check_labels

FEATURES = ("confidence", "entropy")


def _check_logits(logits, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim < 2:
        raise ValueError(f"{name} logits must have shape [..., n, C]; got ndim={logits.ndim}")
    if logits.shape[-2] == 0:
        raise ValueError(f"{name} set is empty")
    if not np.isfinite(logits).all():
        raise ValueError(f"{name} logits contain NaN or inf")
    _check_labels(labels, logits.shape[-2], logits.shape[-1])
    return logits, labels


def _log_probs_of_labels(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    log_probs = log_softmax(logits, axis=-1)
    return np.take_along_axis(log_probs, np.broadcast_to(labels[:, None], log_probs.shape[:-1] + (1,)), axis=-1)[..., 0]


def _feature(logits: np.ndarray, labels: np.ndarray, feature: str) -> np.ndarray:
    """SalUn/MUSO attack features: true-class confidence p_y, or prediction entropy (nats)."""
    if feature == "confidence":
        return np.exp(_log_probs_of_labels(logits, labels))
    if feature == "entropy":
        log_probs = log_softmax(logits, axis=-1)
        return -(np.exp(log_probs) * log_probs).sum(axis=-1)
    raise ValueError(f"unknown feature {feature!r}; expected one of {FEATURES}")


def _attacker() -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression())


def _balanced(members: np.ndarray, non_members: np.ndarray, rng: np.random.Generator):
    """Feature matrix and 1/0 labels with the larger side subsampled to the smaller's size."""
    size = min(members.size, non_members.size)
    members = rng.choice(members, size, replace=False)
    non_members = rng.choice(non_members, size, replace=False)
    x = np.concatenate([members, non_members])[:, None]
    y = np.concatenate([np.ones(size, dtype=int), np.zeros(size, dtype=int)])
    return x, y


def _loss_attack(forget_loss: np.ndarray, test_loss: np.ndarray, n_splits: int, seed: int) -> dict:
    x, y = _balanced(forget_loss, test_loss, np.random.default_rng(seed))
    if x.shape[0] // 2 < n_splits:
        raise ValueError(f"need at least n_splits={n_splits} examples per class after balancing; got {x.shape[0] // 2}")
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    scores = cross_validate(_attacker(), x, y, cv=cv, scoring=("accuracy", "roc_auc"))
    return {"acc": float(scores["test_accuracy"].mean()), "auc": float(scores["test_roc_auc"].mean())}


def _efficacy_attack(retain_feat, test_feat, forget_feat, seed: int) -> dict:
    x, y = _balanced(retain_feat, test_feat, np.random.default_rng(seed))
    predicted_member = _attacker().fit(x, y).predict(forget_feat[:, None])
    member_rate = float(predicted_member.mean())
    return {"efficacy": 1.0 - member_rate, "member_rate": member_rate}


def label_losses(logits, labels) -> np.ndarray:
    """Cross-entropy of each sample's label under one model's logits [n, C]: the loss attack's feature."""
    return -_log_probs_of_labels(*_check_logits(logits, labels, "samples"))


def loss_mia(forget_logits, forget_labels, test_logits, test_labels, n_splits: int = 10, seed: int = 0) -> dict:
    """Starting-kit loss attack for one model: cross-validated {'acc', 'auc'}, forget vs test."""
    forget_loss = -_log_probs_of_labels(*_check_logits(forget_logits, forget_labels, "forget"))
    test_loss = -_log_probs_of_labels(*_check_logits(test_logits, test_labels, "test"))
    return _loss_attack(forget_loss, test_loss, n_splits, seed)


def mia_efficacy(
    retain_logits, retain_labels, test_logits, test_labels, forget_logits, forget_labels,
    feature: str = "confidence", seed: int = 0,
) -> dict:
    """SalUn MIA-efficacy for one model: {'efficacy', 'member_rate'} on the forget set.

    The attacker is fit on balanced retain (member) vs test (non-member) features and
    applied to every forget example; efficacy = fraction predicted non-member.
    """
    feats = [
        _feature(*_check_logits(logits, labels, name), feature)
        for logits, labels, name in (
            (retain_logits, retain_labels, "retain"), (test_logits, test_labels, "test"), (forget_logits, forget_labels, "forget")
        )
    ]
    return _efficacy_attack(*feats, seed)


def mia_over_models(
    attack: str, *, forget_logits, forget_labels, test_logits, test_labels,
    retain_logits=None, retain_labels=None, feature: str = "confidence", n_splits: int = 10, seed: int = 0,
) -> dict:
    """Run attack 'loss' (loss_mia) or 'efficacy' (mia_efficacy) on every model of a stack.

    Logits are [N_models, n, C] with labels [n] shared by all models. Every model uses the same
    seed, so models differ only by their logits. Returns {metric: {'mean', 'std', 'per_model'}}
    (std over models, ddof=0).
    """
    forget_logits, forget_labels = _check_logits(forget_logits, forget_labels, "forget")
    test_logits, test_labels = _check_logits(test_logits, test_labels, "test")
    if forget_logits.ndim != 3 or test_logits.ndim != 3 or forget_logits.shape[0] != test_logits.shape[0]:
        raise ValueError(
            f"forget and test logits must be stacks [N_models, n, C] with the same N; "
            f"got {forget_logits.shape} and {test_logits.shape}"
        )
    if attack == "loss":
        forget_loss = -_log_probs_of_labels(forget_logits, forget_labels)
        test_loss = -_log_probs_of_labels(test_logits, test_labels)
        results = [_loss_attack(f, t, n_splits, seed) for f, t in zip(forget_loss, test_loss)]
    elif attack == "efficacy":
        if retain_logits is None or retain_labels is None:
            raise ValueError("attack='efficacy' needs retain_logits and retain_labels")
        retain_logits, retain_labels = _check_logits(retain_logits, retain_labels, "retain")
        if retain_logits.ndim != 3 or retain_logits.shape[0] != forget_logits.shape[0]:
            raise ValueError(f"retain logits must be a stack with N={forget_logits.shape[0]}; got {retain_logits.shape}")
        retain_feat = _feature(retain_logits, retain_labels, feature)
        test_feat = _feature(test_logits, test_labels, feature)
        forget_feat = _feature(forget_logits, forget_labels, feature)
        results = [_efficacy_attack(r, t, f, seed) for r, t, f in zip(retain_feat, test_feat, forget_feat)]
    else:
        raise ValueError(f"unknown attack {attack!r}; expected 'loss' or 'efficacy'")
    return {
        key: {
            "mean": float(np.mean([r[key] for r in results])),
            "std": float(np.std([r[key] for r in results])),
            "per_model": [r[key] for r in results],
        }
        for key in results[0]
    }
