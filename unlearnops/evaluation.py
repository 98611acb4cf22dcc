"""Evaluation of one method's N unlearned models against the N retrained models.

Reads stored logits only. Computes what the report shows about one method: accuracy per
split, the competition's forgetting quality F and Final score (with intervals over the forget
examples),
membership inference (loss attack, MIA-efficacy) beside the retrained models' values,
agreement with retraining, and time.
"""
from __future__ import annotations

import numpy as np

from unlearnops.config import build_dataclass
from unlearnops.metrics import agreement, epsilon, mean_std, mia
from unlearnops.outputs import EVAL_SPLITS, RunOutputs
from dataclasses import dataclass


@dataclass
class EvalConfig:
    """params.yaml `evaluate`."""

    seed: int
    retain_max_samples: int | None
    interval_level: float
    mia_models: int
    mia_splits: int
    js_bins: int
    time_budget: float  # the report flags methods slower than this fraction of retraining
    ulira: dict  # U-LiRA's own section, checked by unlearnops.ulira.config_from (only its stage reads it)


def eval_config(params: dict) -> EvalConfig:
    return build_dataclass(EvalConfig, params["evaluate"], "evaluate")


def accuracy_summary(run: RunOutputs) -> dict:
    return {split: mean_std(run.accuracy(split)) for split in EVAL_SPLITS if split in run.logits}


def forget_confidences(run: RunOutputs) -> np.ndarray:
    """Logit-scaled confidence of every model on every forget example: [N, n_forget]."""
    return epsilon.logit_scaled_confidence(run.logits["forget"], run.labels["forget"])


def membership_inference(run: RunOutputs, cfg: EvalConfig) -> dict:
    """Loss attack (forget vs test) and MIA-efficacy (retain-vs-test attacker on forget),
    on the first `mia_models` models of a run."""
    keep = slice(0, cfg.mia_models)
    logits = {s: run.logits[s][keep] for s in ("retain", "forget", "test")}
    common = dict(forget_logits=logits["forget"], forget_labels=run.labels["forget"], test_logits=logits["test"], test_labels=run.labels["test"], seed=cfg.seed)
    loss = mia.mia_over_models("loss", n_splits=cfg.mia_splits, **common)
    result = {"loss_attack_acc": loss["acc"]["mean"], "loss_attack_auc": loss["auc"]["mean"]}
    for feature in ("confidence", "entropy"):
        eff = mia.mia_over_models("efficacy", retain_logits=logits["retain"], retain_labels=run.labels["retain"], feature=feature, **common)
        result[f"efficacy_{feature}"] = eff["efficacy"]["mean"]
    return result


def competition_score(unlearned: RunOutputs, retrained: RunOutputs, cfg: EvalConfig) -> tuple[dict, np.ndarray]:
    """F and Final with intervals over the forget examples (`epsilon.scores_with_intervals`:
    models fixed, so they do not include model-sampling noise); also returns the per-example epsilons."""
    conf_u, conf_r = forget_confidences(unlearned), forget_confidences(retrained)
    n = min(unlearned.n_models, retrained.n_models)  # the score pairs N unlearned with N retrained
    conf_u, conf_r = conf_u[:n], conf_r[:n]
    accuracies = {
        "retain_unlearned": unlearned.accuracy("retain")[:n],
        "retain_retrained": retrained.accuracy("retain")[:n],
        "test_unlearned": unlearned.accuracy("test")[:n],
        "test_retrained": retrained.accuracy("test")[:n],
    }
    epsilons = epsilon.per_example_epsilons(conf_u, conf_r)
    scores = epsilon.scores_with_intervals(epsilons, n, accuracies, level=cfg.interval_level)
    score = {
        "n_models_scored": n,
        **scores,
        "epsilon_mean": float(epsilons.mean()),
        "js_divergence_mean": float(agreement.js_divergence_per_example(conf_u, conf_r, cfg.js_bins).mean()),
    }
    return score, epsilons


def evaluate_method(unlearned: RunOutputs, retrained: RunOutputs, retrain_mia: dict, params: dict) -> tuple[dict, dict]:
    """Metrics of one method (for metrics JSON) and per-example arrays (for the report's plots).
    `retrain_mia`: membership_inference(retrained) with the same settings, computed once per pipeline."""
    cfg = eval_config(params)
    acc_u, acc_r = accuracy_summary(unlearned), accuracy_summary(retrained)
    gaps = agreement.accuracy_gaps(
        {s: acc_u[s]["mean"] for s in ("retain", "forget", "test")}, {s: acc_r[s]["mean"] for s in ("retain", "forget", "test")}
    )
    score, epsilons = competition_score(unlearned, retrained, cfg)
    seconds_u, seconds_r = float(np.mean(unlearned.seconds_per_model)), float(np.mean(retrained.seconds_per_model))
    metrics = {
        "n_models": unlearned.n_models,
        "accuracy": acc_u,
        "retrain_accuracy": acc_r,
        "accuracy_gap": {**gaps["gaps"], "average": gaps["average_gap"]},
        **score,
        "mia": membership_inference(unlearned, cfg),
        "retrain_mia": retrain_mia,
        "seconds_per_model": seconds_u,
        "time_vs_retrain": seconds_u / seconds_r,
    }
    arrays = {"epsilons": epsilons, "confidence_unlearned": forget_confidences(unlearned), "forget_ids": unlearned.ids["forget"]}
    return metrics, arrays


def retrain_noise_floor(retrained: RunOutputs, params: dict) -> dict:
    """The score of retraining itself: half of the retrained models scored against the other half.

    With finite N even two sets of identically trained models are told apart on some
    examples, so this is the best F a method can reach at N/2 models (a reference row). Its
    interval is the same kind as a method's (forget examples, models fixed) and holds its estimate.
    """
    cfg = eval_config(params)
    half = retrained.n_models // 2
    first, second = (RunOutputs({s: v[sl] for s, v in retrained.logits.items()}, retrained.labels, retrained.ids, retrained.seconds_per_model[sl], retrained.wall_seconds) for sl in (slice(0, half), slice(half, 2 * half)))
    score, _ = competition_score(first, second, cfg)
    return score
