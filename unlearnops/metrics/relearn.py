"""The relearning attack (Layered Unlearning, arXiv 2505.09500; docs/metric.md, section 3).

The forget set is cut into k folds (`unlearnops.folds.assign_folds`, the folds Layered Unlearning
uses). For every non-empty proper subset S of the folds, the attacker fine-tunes each model on S
alone for a few epochs with a small learning rate and measures accuracy on the other folds
T = F \\ S after every epoch; the attack's result is its best epoch (epochs 1..E, per model;
the accuracy before the attack is reported beside it). A method that really forgot
keeps T near where the retrained models end up under the same attack (fine-tuning on S also
teaches a model that never saw T something about T: that is the reference, not zero).

All models of a stack are attacked at once by the training engine. Fold numbers in the output
are 1..k, as in F_1..F_k.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unlearnops.config import ConfigError, build_dataclass
from unlearnops.data import Part
from unlearnops.metrics import mean_std
from unlearnops.folds import assign_folds, part_where, proper_subsets
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, Runtime, Stream, cross_entropy_on, fit, predict


@dataclass
class RelearnConfig:
    """params.yaml `relearn`."""

    k: int
    fold_seed: int
    n_models: int  # attack the first n_models models of a stack
    fit: dict  # the attacker's optimiser (FitConfig keys)

    def fit_config(self) -> FitConfig:
        cfg = build_dataclass(FitConfig, self.fit, "relearn.fit")
        if cfg.epochs < 1:
            raise ConfigError(f"relearn.fit.epochs must be at least 1, got {cfg.epochs}")
        return cfg


def config_from(params: dict) -> RelearnConfig:
    cfg = build_dataclass(RelearnConfig, params.get("relearn"), "relearn")
    if cfg.n_models < 1:
        raise ConfigError(f"relearn.n_models must be at least 1, got {cfg.n_models}")
    cfg.fit_config()  # fail on bad optimiser settings before any work
    return cfg


def subset_key(folds: tuple[int, ...]) -> str:
    """'F1', 'F1_F3', ...: a name for a set of folds (given 0-based) that JSON, DVC and MLflow accept."""
    return "_".join(f"F{f + 1}" for f in folds)


def _accuracy(stack: ModelStack, part: Part, runtime: Runtime) -> np.ndarray:
    return (predict(stack, part.x, runtime).argmax(-1) == part.y).float().mean(1).numpy()


def relearning_attack(stack: ModelStack, forget: Part, cfg: RelearnConfig, runtime: Runtime) -> dict:
    """Attack the first cfg.n_models models of `stack`; per subset S: accuracy on T before the
    attack, the best accuracy on T over the attack's epochs and the mean accuracy at each epoch."""
    fit_cfg = cfg.fit_config()
    models = stack.select(slice(0, min(cfg.n_models, stack.n)))
    fold = assign_folds(forget.ids, cfg.k, cfg.fold_seed)
    subsets = {}
    for subset in proper_subsets(cfg.k):
        in_s = np.isin(fold, subset)
        train_on, target = part_where(forget, in_s), part_where(forget, ~in_s)
        accuracy = np.zeros((fit_cfg.epochs + 1, models.n))  # row 0: before the attack
        accuracy[0] = _accuracy(models, target, runtime)

        def record(epoch: int, index: slice, chunk: ModelStack) -> None:
            accuracy[epoch, index] = _accuracy(chunk, target, runtime)

        stream = Stream(train_on.x, train_on.y, fit_cfg.batch_size)
        fit(models, {"relearn": stream}, cross_entropy_on("relearn"), fit_cfg, runtime, driver="relearn", desc=f"relearn {subset_key(subset)}", on_epoch_end=record)
        subsets[subset_key(subset)] = {
            "S": [f + 1 for f in subset],
            "T": [f + 1 for f in range(cfg.k) if f not in subset],
            "n_train": int(in_s.sum()),
            "n_target": int((~in_s).sum()),
            "before": mean_std(accuracy[0]),
            "after": mean_std(accuracy[1:].max(axis=0)),  # the attacker keeps its best epoch, per model
            "per_epoch": [float(a) for a in accuracy.mean(axis=1)],
        }
    return {
        "n_models": models.n,
        "k": cfg.k,
        "fold_seed": cfg.fold_seed,
        "fold_sizes": np.bincount(fold, minlength=cfg.k).tolist(),
        "epochs": fit_cfg.epochs,
        "subsets": subsets,
    }


def with_retrain_reference(result: dict, retrain: dict) -> dict:
    """A method's attack result with the retrained models' result beside each subset, and the gap
    (method after attack - retrain after attack). Both must come from the same folds."""
    for key in ("k", "fold_seed", "fold_sizes", "epochs"):
        if result[key] != retrain[key]:
            raise ConfigError(f"the retrain relearning result has {key}={retrain[key]} but this run has {result[key]}; rerun the evaluate_retrain stage")
    subsets = {}
    for key, entry in result["subsets"].items():
        reference = retrain["subsets"][key]
        subsets[key] = {
            **entry,
            "retrain": {"before": reference["before"], "after": reference["after"]},
            "gap_to_retrain": entry["after"]["mean"] - reference["after"]["mean"],
        }
    return {**result, "subsets": subsets}
