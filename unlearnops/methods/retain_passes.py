"""Passes over retain for the methods whose authors' schedules exceed the time budget.

The competition limited a method to about a fifth of the retraining time; on the default
setting (retrain = 15 epochs) that is 3 retain epochs, less than several authors' schedules
(8 retain rounds, 5 epochs, ...). Those methods keep the authors' number of passes and visit
only a `retain_fraction` of retain in each (each model its own random part): the same
algorithm with fewer steps. `retain_fraction: 1.0` is the authors' full passes.

The engine's `steps_per_epoch` makes such a partial pass: each model draws its retain batches
from its own shuffle of all of retain, and successive epochs of one fit continue that shuffle.
"""
from __future__ import annotations

import math
from dataclasses import replace

from unlearnops.config import ConfigError
from unlearnops.stack import ModelStack


def check_retain_fraction(value: float, where: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{where} must be a number in (0, 1], got {value!r}")
    return float(value)


def retain_steps(n_retain: int, batch_size: int, fraction: float) -> int:
    """Steps of a pass over `fraction` of retain: round(fraction x batches per epoch), at least one."""
    return max(1, round(fraction * math.ceil(n_retain / min(batch_size, n_retain))))


def reseeded(models: ModelStack, pass_index: int) -> ModelStack:
    """The models with seeds derived from (seed, pass_index).

    The engine draws a model's data order from its seed, so separate engine calls with the same
    seeds would all see the same order; a method that runs one call per round (kl_contrastive)
    gives each round its own seeds, as the authors' DataLoader reshuffles every round. Restore
    the original seeds on the result with `replace(result, seeds=models.seeds)`."""
    return replace(models, seeds=[seed * 1_000_033 + pass_index for seed in models.seeds])
