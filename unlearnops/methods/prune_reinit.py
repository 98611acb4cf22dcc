"""Prune and re-initialise (NeurIPS 2023 unlearning competition, 4th place).

Prune most conv/linear weights by L1 magnitude (torch.nn.utils.prune's rule) and give the
pruned entries fresh random values from the architecture's own initialiser, so what the
model stored in them (the forget set included) is gone; then fine-tune on retain with
class-weighted cross-entropy plus an MSE that keeps the entropy of each prediction close to
the original model's, so the unlearned model is as (un)certain as the original on retain data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unlearnops.config import ConfigError, build_dataclass, choose
from unlearnops.methods import register
from unlearnops.methods.base import Unlearner
from unlearnops.methods.weight_surgery import LAYER_KINDS, SCOPES, check_fraction, fraction_masks, layer_weight_names
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, fit


def prune_and_reinit(models: ModelStack, names: list[str], fraction: float, scope: str) -> ModelStack:
    """Replace the `fraction` smallest-|w| entries of the named weights by fresh initial values;
    run i's fresh values come from the architecture's initialiser seeded with models.seeds[i]."""
    pruned = fraction_masks({name: models.params[name].abs() for name in names}, fraction, scope, largest=False)
    fresh = ModelStack.fresh(models.spec, models.seeds)
    params = dict(models.params)
    for name, mask in pruned.items():
        params[name] = torch.where(mask, fresh.params[name], params[name])
    return ModelStack(models.spec, params, dict(models.buffers), models.seeds)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


@register("prune_reinit")
class PruneReinit(Unlearner):
    @dataclass
    class Hparams:
        prune_fraction: float
        prune_layers: list
        prune_scope: str
        class_weight_exponent: float
        entropy_weight: float
        fit: dict

        def __post_init__(self):
            build_dataclass(FitConfig, self.fit, "methods.prune_reinit.fit")
            check_fraction(self.prune_fraction, "methods.prune_reinit.prune_fraction")
            choose(self.prune_scope, SCOPES, "methods.prune_reinit.prune_scope")
            if not self.prune_layers:
                raise ConfigError(f"methods.prune_reinit.prune_layers is empty; allowed: {', '.join(LAYER_KINDS)}")
            for kind in self.prune_layers:
                choose(kind, LAYER_KINDS, "methods.prune_reinit.prune_layers entry")

    def class_weights(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """w_c = (1 / count_c) ** exponent over the retain labels (absent classes count as 1)."""
        counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).float()
        return counts.pow(-self.hp.class_weight_exponent)

    def unlearn(self, models, data, runtime):
        names = layer_weight_names(models.spec, self.hp.prune_layers, self.name)
        pruned = prune_and_reinit(models, names, self.hp.prune_fraction, self.hp.prune_scope)
        original = models.module(0).to(runtime.device).requires_grad_(False)  # every run starts from the same original
        weights = self.class_weights(data.retain.y, data.num_classes).to(runtime.device)
        beta = self.hp.entropy_weight

        def loss(forward, batches):
            x, y = batches["retain"]
            logits = forward(x)
            original_entropy = entropy(original(x)).detach()
            return F.cross_entropy(logits, y, weight=weights) + beta * F.mse_loss(entropy(logits), original_entropy)

        return fit(pruned, {"retain": self.retain_stream(data)}, loss, self.fit_config(), runtime, driver="retain", desc=self.name)
