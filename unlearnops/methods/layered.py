"""Layered Unlearning (Qian et al. 2025, arXiv 2505.09500) around any registered base method.

The forget set is cut into k folds F_1..F_k (`unlearnops.folds.assign_folds`, the same folds the
relearning attack uses). Stage i runs the base method U from the previous stage's models with
    forget = F_1 u ... u F_i,   retain = R u F_{i+1} u ... u F_k,
and the base method's hyperparameters overridden by `stages[i]`. Each stage builds a separate
"inhibitor" for the folds it adds, so relearning on some folds recovers the others less than
after unlearning everything at once.

Follows the authors' 12tqian/layered-unlearning `script.py` (`run`: the learned model, then
"base-lu-partial" unlearning A while B stays in the training data, then "base-lu" unlearning
both, each stage from the previous stage's weights with the same settings). Their unlearning
step is training with the unlearned tasks relabelled as background (their 2D experiment, which
benchmarks/layered_2d.py reproduces); here any registered method is the stage's U
(`methods.layered.base`, default neggrad_plus). Each stage runs 1 epoch of the base method
(`stages`), so the two stages cost the base method's 2 epochs and fit the time budget.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from unlearnops.config import ConfigError, choose
from unlearnops.folds import assign_folds, concat_parts, layered_stages, part_where
from unlearnops.methods import available, get_method, register
from unlearnops.methods.base import UnlearnData, Unlearner


def apply_overrides(base: dict, overrides: dict, where: str) -> dict:
    """`base` with the keys of `overrides` replaced, recursing into nested mappings
    (so `{fit: {lr: 0.01}}` keeps the other `fit` keys). Keys the base lacks are errors."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if key not in merged:
            raise ConfigError(f"{where}: unknown key '{key}'; allowed: {sorted(merged)}")
        if isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = apply_overrides(merged[key], value, f"{where}.{key}")
        else:
            merged[key] = value
    return merged


@register("layered")
class Layered(Unlearner):
    @dataclass
    class Hparams:
        base: str  # registry name of the method run at every stage
        k: int  # number of folds = number of stages
        fold_seed: int  # seed of the fold assignment
        stages: list | None  # per-stage overrides of methods.<base>; shorter than k: the last repeats

    def __init__(self, hparams: dict, params: dict):
        super().__init__(hparams, params)
        hp = self.hp
        choose(hp.base, [m for m in available() if m != self.name], "methods.layered.base")
        if hp.k < 2:
            raise ConfigError(f"methods.layered.k must be at least 2, got {hp.k}")
        if not isinstance(hp.stages, (list, type(None))):
            raise ConfigError(f"methods.layered.stages must be a list of per-stage overrides, got {hp.stages!r}")
        overrides = list(hp.stages or [])
        if len(overrides) > hp.k:
            raise ConfigError(f"methods.layered.stages has {len(overrides)} entries but k = {hp.k}; give at most k")
        base_hparams = params.get("methods", {}).get(hp.base)
        if base_hparams is None:
            raise ConfigError(f"params.yaml has no hyperparameters for methods.layered.base '{hp.base}' (expected methods.{hp.base})")
        # Build every stage's method now, so a bad override fails before any training.
        self.stage_methods = []
        for i in range(hp.k):
            j = min(i, len(overrides) - 1)
            override = (overrides[j] if overrides else None) or {}
            where = f"methods.layered.stages[{j}]"
            if not isinstance(override, dict):
                raise ConfigError(f"{where} must be a mapping of {hp.base} hyperparameters, got {override!r}")
            stage_hparams = apply_overrides(base_hparams, override, where)
            stage_params = {**params, "methods": {**params["methods"], hp.base: stage_hparams}}
            self.stage_methods.append(get_method(hp.base, stage_params))

    def unlearn(self, models, data, runtime):
        fold = assign_folds(data.forget.ids, self.hp.k, self.hp.fold_seed)
        for method, (forget_folds, kept_folds) in zip(self.stage_methods, layered_stages(self.hp.k)):
            method.shared_seed = self.shared_seed  # a chunk's stages share the whole stage's steps too
            stage_data = UnlearnData(
                retain=concat_parts(data.retain, part_where(data.forget, np.isin(fold, kept_folds))),
                forget=part_where(data.forget, np.isin(fold, forget_folds)),
                val=data.val,
                num_classes=data.num_classes,
                augment=data.augment,
            )
            models = method.unlearn(models, stage_data, runtime)
        return models
