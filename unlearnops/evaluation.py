"""Evaluation of one method's N unlearned models against the N retrained models.

Reads stored logits only. Everything a report shows about one method is computed here.
"""
from __future__ import annotations

import numpy as np

from unlearnops.outputs import EVAL_SPLITS, RunOutputs


def mean_std(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def accuracy_summary(run: RunOutputs) -> dict:
    return {split: mean_std(run.accuracy(split)) for split in EVAL_SPLITS if split in run.logits}


def evaluate_method(unlearned: RunOutputs, retrained: RunOutputs, params: dict) -> dict:
    """Metrics of one method: accuracy per split (mean, std over models), gaps to retrain, time."""
    acc_u, acc_r = accuracy_summary(unlearned), accuracy_summary(retrained)
    gaps = {split: abs(acc_u[split]["mean"] - acc_r[split]["mean"]) for split in ("retain", "forget", "test")}
    seconds_u, seconds_r = float(np.mean(unlearned.seconds_per_model)), float(np.mean(retrained.seconds_per_model))
    return {
        "n_models": unlearned.n_models,
        "accuracy": acc_u,
        "retrain_accuracy": acc_r,
        "accuracy_gap": {**gaps, "average": float(np.mean(list(gaps.values())))},
        "seconds_per_model": seconds_u,
        "time_vs_retrain": seconds_u / seconds_r,
    }
