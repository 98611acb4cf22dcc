"""Conv perturbation (NeurIPS 2023 competition, 3rd place).

Replace conv kernels w by samples of N(w, noise_std^2) (the write-up: the first conv layer,
std 0.6), fine-tune on retain with class-weighted cross-entropy (weights 1/count, so rare
classes recover as fast as common ones), perturb lightly once more (reperturb_std) and run
a last pass. The noise destroys what the first layers memorised about individual samples;
fine-tuning on retain relearns only what retain supports.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unlearnops.config import ConfigError, choose
from unlearnops.methods import register
from unlearnops.methods.base import Unlearner
from unlearnops.methods.weight_surgery import conv_weight_names, model_generators, stacked_draw
from unlearnops.stack import ModelStack
from unlearnops.training import fit

LAYER_CHOICES = ("first", "all")
PERTURB_SALT, REPERTURB_SALT = 1, 2  # separate noise streams for the two perturbations


def perturb_conv(models: ModelStack, names: list[str], std: float, salt: int) -> ModelStack:
    """Conv kernels `names` of every model replaced by N(w, std^2); model i's noise from seeds[i]."""
    generators = model_generators(models.seeds, salt)
    params = dict(models.params)
    for name in names:
        shape = params[name].shape[1:]
        noise = stacked_draw(generators, lambda g: torch.randn(shape, generator=g))
        params[name] = params[name] + std * noise.to(params[name])
    return ModelStack(models.spec, params, models.buffers, models.seeds)


def inverse_frequency_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """1/count per class (a class absent from retain gets weight 0: it never appears as a target)."""
    counts = torch.bincount(y, minlength=num_classes).float()
    return torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))


@register("conv_perturb")
class ConvPerturb(Unlearner):
    @dataclass
    class Hparams:
        layers: str  # first | all: the conv layers whose kernels are perturbed
        noise_std: float  # std of the first perturbation
        reperturb_std: float  # std of the light perturbation before the last pass
        fit: dict  # fine-tuning on retain after the first perturbation
        last_fit: dict  # fine-tuning on retain after the re-perturbation

    def __init__(self, hparams: dict, params: dict):
        super().__init__(hparams, params)
        choose(self.hp.layers, LAYER_CHOICES, "methods.conv_perturb.layers")
        if self.hp.noise_std < 0 or self.hp.reperturb_std < 0:
            raise ConfigError(f"methods.conv_perturb: noise stds must be >= 0, got noise_std={self.hp.noise_std}, reperturb_std={self.hp.reperturb_std}")
        self.fit_config("fit"), self.fit_config("last_fit")  # bad optimiser settings fail before training

    def perturbed_layers(self, spec: dict) -> list[str]:
        names = conv_weight_names(spec, self.name)
        return names[:1] if self.hp.layers == "first" else names

    def unlearn(self, models, data, runtime):
        names = self.perturbed_layers(models.spec)
        weights = inverse_frequency_weights(data.retain.y, data.num_classes).to(runtime.device)

        def loss(forward, batches):
            x, y = batches["retain"]
            return F.cross_entropy(forward(x), y, weight=weights)

        first, last = self.fit_config("fit"), self.fit_config("last_fit")
        models = perturb_conv(models, names, self.hp.noise_std, PERTURB_SALT)
        models = fit(models, {"retain": self.retain_stream(data, first.batch_size)}, loss, first, runtime, driver="retain", desc=self.name)
        models = perturb_conv(models, names, self.hp.reperturb_std, REPERTURB_SALT)
        return fit(models, {"retain": self.retain_stream(data, last.batch_size)}, loss, last, runtime, driver="retain", desc=f"{self.name} last")
