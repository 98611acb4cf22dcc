"""Weight surgery on stacked models: find layers, transpose kernels, prune by magnitude.

Methods that edit weights before fine-tuning (pruning, kernel transposition, saliency
masks) work on the stacked tensors of a `ModelStack` ([N, ...] per tensor), so all N runs
are edited at once. This module registers no method.
"""
from __future__ import annotations

import torch
from torch import nn

from unlearnops.config import ConfigError, choose
from unlearnops.nets import build_model
from unlearnops.stack import ModelStack

LAYER_KINDS = {"conv": nn.Conv2d, "linear": nn.Linear}
SCOPES = ("per_tensor", "global")


def check_fraction(value: float, what: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{what} must be a number in [0, 1], got {value!r}")
    return value


def layer_weight_names(spec: dict, kinds: list[str]) -> list[str]:
    """Names of the `.weight` tensors of every layer of the given kinds (conv | linear)."""
    types = tuple(LAYER_KINDS[choose(kind, LAYER_KINDS, "layer kind")] for kind in kinds)
    model = build_model(spec)
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, types)]


def require_layers(spec: dict, kinds: list[str], method: str) -> list[str]:
    """Like `layer_weight_names`, but a method that needs such layers fails clearly without them."""
    names = layer_weight_names(spec, kinds)
    if not names:
        raise ConfigError(f"method '{method}' needs {' or '.join(kinds)} layers, but architecture '{spec['arch']}' has none")
    return names


def transpose_conv_kernels(models: ModelStack, conv_names: list[str]) -> ModelStack:
    """Every conv kernel with its two spatial axes swapped (w.transpose(-1, -2)); the rest kept."""
    params = dict(models.params)
    for name in conv_names:
        weight = params[name]
        if weight.shape[-1] != weight.shape[-2]:
            raise ConfigError(f"cannot transpose conv kernel '{name}' of shape {tuple(weight.shape[1:])}: it is not square")
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
