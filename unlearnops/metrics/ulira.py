"""U-LiRA's attack math: per-example likelihood ratios and the attack's accuracy, AUC and TPR at low FPR.

U-LiRA (Hayes et al., "Inexact Unlearning Needs More Careful Evaluations to Avoid a False Sense of
Privacy", arXiv 2403.01218) is the online likelihood-ratio attack of Carlini et al. ("Membership
Inference Attacks From First Principles", arXiv 2112.03570) asked a different question: was this
example trained on and then unlearned ("in"), or never seen ("out")? For every example the
logit-scaled confidence of its true label (unlearnops.metrics.epsilon.logit_scaled_confidence)
is modelled by one Gaussian over shadow models where it was in and one where it was out; a
(model, example) pair is scored by log N(c; in) - log N(c; out).

The shadow runs come in splits (unlearnops.ulira): every run of split k shares its membership.
A run is scored with Gaussians fit on the OTHER splits only (leave one split out), so no target
is ever part of its own shadow set. With few shadow models per example the variance is one
per side, pooled over examples (Carlini et al.'s "fixed variance", better below ~64 shadows);
the means are per example.

Metrics are over all scored (model, example) pairs: AUC (scikit-learn), the accuracy of the best
threshold (balanced: (TPR + TNR) / 2, in and out counts differ a little), and TPR at 1% and 0.1%
FPR (the largest TPR whose FPR is at most the target, as Carlini et al. report it). A TPR at
FPR f means something only with well over 1/f negatives: 0.1% needs >= 1000; the result says how
many there were. Every figure depends on the number of shadow models.
"""
from __future__ import annotations

import numpy as np

FPR_TARGETS = (0.01, 0.001)
MIN_VARIANCE = 1e-6  # a side whose confidences are all equal (a model that never moves) still has a density


def _side(conf: np.ndarray, mask: np.ndarray, fixed_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and standard deviation of conf[mask] ([R, E] each); NaN where an example has no run."""
    count = mask.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(mask, conf, 0.0).sum(0) / count
        residual = np.where(mask, conf - mean, 0.0)
        if fixed_variance:
            var = np.full(conf.shape[1], (residual**2).sum() / max(1, count.sum() - (count > 0).sum()))
        else:
            var = (residual**2).sum(0) / np.maximum(count - 1, 1)
    return mean, np.sqrt(np.maximum(var, MIN_VARIANCE))


def _log_normal(x: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mean) / sd) ** 2 - np.log(sd)


def likelihood_ratios(conf: np.ndarray, member: np.ndarray, split: np.ndarray, fixed_variance: bool = True) -> np.ndarray:
    """log N(c; in) - log N(c; out) for every (run, example) pair, [R, E].

    conf: [R, E] confidences; member: [R, E] True where the example was in the run's split (trained
    on, then unlearned); split: [R] the split of each run. Run r's Gaussians are fit on the runs of
    every other split. NaN where those hold no in or no out run of the example."""
    conf, member, split = np.asarray(conf, dtype=np.float64), np.asarray(member, dtype=bool), np.asarray(split)
    if conf.shape != member.shape or conf.ndim != 2 or split.shape != (conf.shape[0],):
        raise ValueError(f"conf and member must be [R, E] and split [R]; got {conf.shape}, {member.shape}, {split.shape}")
    scores = np.full(conf.shape, np.nan)
    for k in np.unique(split):
        target, shadow = split == k, split != k
        mean_in, sd_in = _side(conf[shadow], member[shadow], fixed_variance)
        mean_out, sd_out = _side(conf[shadow], ~member[shadow], fixed_variance)
        scores[target] = _log_normal(conf[target], mean_in, sd_in) - _log_normal(conf[target], mean_out, sd_out)
    return scores


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The largest TPR of the ROC curve whose FPR is at most `target`."""
    return float(tpr[fpr <= target].max(initial=0.0))


def attack_metrics(scores: np.ndarray, member: np.ndarray) -> dict:
    """AUC, best-threshold (balanced) accuracy and TPR at 1% / 0.1% FPR over the scored pairs."""
    from sklearn.metrics import roc_auc_score, roc_curve

    scores, member = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(member, dtype=bool).ravel()
    scored = ~np.isnan(scores)
    scores, member = scores[scored], member[scored]
    n_in, n_out = int(member.sum()), int((~member).sum())
    result = {"n_in": n_in, "n_out": n_out, "n_unscored": int((~scored).sum())}
    if n_in == 0 or n_out == 0:
        return {**result, "auc": None, "accuracy": None, **{f"tpr_at_{f:g}_fpr": None for f in FPR_TARGETS}}
    fpr, tpr, _ = roc_curve(member, scores)
    return {
        **result,
        "auc": float(roc_auc_score(member, scores)),
        "accuracy": float(((tpr + 1 - fpr) / 2).max()),
        **{f"tpr_at_{f:g}_fpr": tpr_at_fpr(fpr, tpr, f) for f in FPR_TARGETS},
    }


def per_example_auc(scores: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Each example's attack AUC over the runs that scored it ([E]; NaN without both in and out runs):
    its vulnerability, 0.5 = the attack cannot tell, 1 = always told apart."""
    from sklearn.metrics import roc_auc_score

    result = np.full(scores.shape[1], np.nan)
    for e in range(scores.shape[1]):
        scored = ~np.isnan(scores[:, e])
        labels = member[scored, e]
        if labels.any() and not labels.all():
            result[e] = roc_auc_score(labels, scores[scored, e])
    return result
