"""Weight surgery on stacked models: which tensors are convolution kernels, per-model noise,
kernel transposition and magnitude masks.

Methods that reset, perturb, transpose, prune or mask weights (grad_reinit, conv_perturb,
conv_transpose, prune_reinit, salun) edit the stacked [N, ...] tensors directly before
fine-tuning. Model i's random draws come from its own generator seeded from `models.seeds[i]`:
the same params give the same models, and model i's draws do not depend on how many models
run beside it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from unlearnops.config import ConfigError, choose
from unlearnops.nets import build_model
from unlearnops.stack import ModelStack

LAYER_KINDS = {"conv": nn.modules.conv._ConvNd, "linear": nn.Linear}
LAYER_WORDS = {"conv": "convolution", "linear": "linear"}
SCOPES = ("per_tensor", "global")


def conv_weight_names(spec: dict, method: str) -> list[str]:
    """Names of the convolution kernels of `spec`'s architecture, in module order."""
    return layer_weight_names(spec, ["conv"], method)


def model_generators(seeds: list[int], salt: int) -> list[torch.Generator]:
    """One CPU generator per model, seeded from its seed; `salt` separates a method's draws."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + salt) for seed in seeds]


def stacked_draw(generators: list[torch.Generator], draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
    """[N, ...]: draw(generator_i) for every model, stacked. Drawing from the same generators
    layer after layer keeps every model's sequence reproducible."""
    return torch.stack([draw(g) for g in generators])


def check_fraction(value: float, what: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{what} must be a number in [0, 1], got {value!r}")
    return value


def layer_weight_names(spec: dict, kinds: list[str], method: str) -> list[str]:
    """Names of the `.weight` of every layer of the given kinds (conv | linear), in module order;
    a method that needs such layers fails clearly on an architecture without them."""
    types = tuple(LAYER_KINDS[choose(kind, LAYER_KINDS, "layer kind")] for kind in kinds)
    model = build_model(spec)
    names = [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, types)]
    if not names:
        words = " or ".join(LAYER_WORDS[kind] for kind in kinds)
        raise ConfigError(f"method '{method}' needs {words} layers, but architecture '{spec['arch']}' has none")
    return names


def transpose_conv_kernels(models: ModelStack, conv_names: list[str]) -> ModelStack:
    """Every 2-D conv kernel with its two spatial axes swapped (w.transpose(-1, -2)); the rest kept."""
    params = dict(models.params)
    for name in conv_names:
        weight = params[name]  # [N, out, in, kh, kw]
        if weight.dim() != 5 or weight.shape[-1] != weight.shape[-2]:
            raise ConfigError(f"cannot transpose conv kernel '{name}' of shape {tuple(weight.shape[1:])}: only square 2-D kernels can")
        params[name] = weight.transpose(-1, -2).contiguous()
    return ModelStack(models.spec, params, dict(models.buffers), models.seeds)


def fraction_masks(scores: dict[str, torch.Tensor], fraction: float, scope: str, *, largest: bool) -> dict[str, torch.Tensor]:
    """Boolean masks marking, per model, the `fraction` of entries with the largest (or smallest) score.

    `scores` maps a tensor name to [N, ...] scores. `per_tensor`: each tensor loses
    round(fraction * numel) entries (torch.nn.utils.prune.l1_unstructured's count);
    `global`: round(fraction * total) entries over all tensors together
    (prune.global_unstructured). Exactly that many entries are marked, ties broken by topk.
    """
    choose(scope, SCOPES, "scope")
    check_fraction(fraction, "fraction")
    names = list(scores)
    n_models = scores[names[0]].shape[0]
    groups = [[name] for name in names] if scope == "per_tensor" else [names]
    masks = {}
    for group in groups:
        flat = torch.cat([scores[name].reshape(n_models, -1) for name in group], dim=1)
        count = round(fraction * flat.shape[1])
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        if count:
            chosen.scatter_(1, torch.topk(flat, count, dim=1, largest=largest).indices, True)
        for name, part in zip(group, chosen.split([scores[name][0].numel() for name in group], dim=1)):
            masks[name] = part.reshape(scores[name].shape)
    return masks
