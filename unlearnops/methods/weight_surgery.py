"""Weight surgery on stacked models: which tensors are convolution kernels, and per-model noise.

Methods that reset or perturb weights (grad_reinit, conv_perturb) edit the stacked [N, ...]
tensors directly before fine-tuning. Model i's random draws come from its own generator seeded
from `models.seeds[i]`: the same params give the same models, and model i's draws do not
depend on how many models run beside it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from unlearnops.config import ConfigError
from unlearnops.nets import build_model


def conv_weight_names(spec: dict, method: str) -> list[str]:
    """Names of the convolution kernels of `spec`'s architecture, in module order."""
    model = build_model(spec)
    names = [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.modules.conv._ConvNd)]
    if not names:
        raise ConfigError(f"method '{method}' needs convolution layers, but architecture '{spec['arch']}' has none")
    return names


def model_generators(seeds: list[int], salt: int) -> list[torch.Generator]:
    """One CPU generator per model, seeded from its seed; `salt` separates a method's draws."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + salt) for seed in seeds]


def stacked_draw(generators: list[torch.Generator], draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
    """[N, ...]: draw(generator_i) for every model, stacked. Drawing from the same generators
    layer after layer keeps every model's sequence reproducible."""
    return torch.stack([draw(g) for g in generators])
