"""Gradient-guided re-initialisation (NeurIPS 2023 competition, 2nd place).

1. Gradient information: accumulate the gradient of  -CE(forget) + CE(retain subsample)
   (ascent on forget, descent on an equally sized random retain subsample) without updating.
2. Re-initialise (He init, fan_out, relu) the `reinit_fraction` of all conv weights (global,
   unstructured, across every conv layer) whose absolute gradient information is smallest.
3. Fine-tune on retain; weights that were not reset learn at `kept_lr_factor` times the
   learning rate (gradient scaling), the reset ones at the full rate. Weight decay, added by
   the optimiser after the scaling, acts at the full rate on all of them.
Model i's retain subsample and fresh weights come from models.seeds[i].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from unlearnops.config import ConfigError
from unlearnops.methods import register
from unlearnops.methods.base import UnlearnData, Unlearner
from unlearnops.methods.weight_surgery import conv_weight_names, model_generators, stacked_draw
from unlearnops.nets import build_model
from unlearnops.stack import ModelStack
from unlearnops.training import Runtime, cross_entropy_on, fit

SUBSAMPLE_SALT, REINIT_SALT = 1, 2  # separate random streams for the two draws


def retain_subsample(seeds: list[int], n_retain: int, size: int) -> torch.Tensor:
    """[N, size] retain indices, model i's drawn without replacement from seeds[i]."""
    size = min(size, n_retain)
    return stacked_draw(model_generators(seeds, SUBSAMPLE_SALT), lambda g: torch.randperm(n_retain, generator=g)[:size])


def gradient_information(models: ModelStack, data: UnlearnData, batch_size: int, runtime: Runtime) -> dict[str, torch.Tensor]:
    """Per model, the gradient of  -CE_sum(forget) + CE_sum(retain subsample), summed over
    batches, for every parameter ([N, ...] each, CPU). Eval mode: batch-norm statistics stay."""
    if len(data.forget) == 0:
        raise ValueError("grad_reinit needs a non-empty forget set for its gradient information")
    device = runtime.device
    base = build_model(models.spec).to(device).eval()
    subsample = retain_subsample(models.seeds, len(data.retain), len(data.forget)).to(device)
    xf, yf = data.forget.x.to(device), data.forget.y.to(device)
    xr, yr = data.retain.x.to(device), data.retain.y.to(device)

    def per_model(p, b, forget_x, forget_y, retain_x, retain_y):
        forward = lambda x: functional_call(base, (p, b), (x,))  # noqa: E731
        return F.cross_entropy(forward(retain_x), retain_y, reduction="sum") - F.cross_entropy(forward(forget_x), forget_y, reduction="sum")

    # The forget batch is shared by all models; each model has its own retain subsample.
    batched = vmap(per_model, in_dims=(0, 0, None, None, 0, 0))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=runtime.bf16)
    grads = []
    for start in range(0, models.n, runtime.models_per_pass):
        index = slice(start, start + runtime.models_per_pass)
        chunk = models.select(index).to(device)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in chunk.params.items()}
        for i in range(0, len(yf), batch_size):
            rows = subsample[index, i : i + batch_size]
            with autocast:
                losses = batched(params, chunk.buffers, xf[i : i + batch_size], yf[i : i + batch_size], xr[rows], yr[rows])
            losses.sum().backward()  # models are independent: each gets its own gradient
        grads.append({k: v.grad.detach().cpu() for k, v in params.items()})
    return {k: torch.cat([g[k] for g in grads]) for k in grads[0]}


def smallest_fraction_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Per model, True for the round(fraction * total) entries with the smallest score,
    ranked globally across all tensors of `scores` (each [N, ...])."""
    flat = torch.cat([s.flatten(1) for s in scores.values()], dim=1)
    k = round(fraction * flat.shape[1])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        threshold = flat.kthvalue(k, dim=1, keepdim=True).values  # O(size), unlike a full sort
        chosen = flat < threshold
        # Ties at the threshold (exact zeros behind dead ReLUs, say): the first ones by position.
        ties = flat == threshold
        chosen |= ties & (ties.cumsum(1, dtype=torch.int32) <= k - chosen.sum(1, keepdim=True))
    masks, offset = {}, 0
    for name, s in scores.items():
        size = s[0].numel()
        masks[name] = chosen[:, offset : offset + size].reshape(s.shape)
        offset += size
    return masks


def reinitialise(models: ModelStack, masks: dict[str, torch.Tensor]) -> ModelStack:
    """Masked entries of each weight replaced by a fresh He (kaiming normal, fan_out, relu)
    initialisation of that tensor; model i's fresh weights drawn from seeds[i]."""
    generators = model_generators(models.seeds, REINIT_SALT)
    params = dict(models.params)
    for name, mask in masks.items():
        shape = params[name].shape[1:]
        fresh = stacked_draw(generators, lambda g: torch.nn.init.kaiming_normal_(torch.empty(shape), mode="fan_out", nonlinearity="relu", generator=g))
        params[name] = torch.where(mask, fresh.to(params[name]), params[name])
    return ModelStack(models.spec, params, models.buffers, models.seeds)


@register("grad_reinit")
class GradReinit(Unlearner):
    @dataclass
    class Hparams:
        reinit_fraction: float  # share of all conv weights re-initialised (global, unstructured)
        kept_lr_factor: float  # learning-rate factor (gradient scale) of the weights not reset
        gradient_batch_size: int  # batch size while accumulating gradient information
        fit: dict  # fine-tuning on retain (the write-up: linear decay with warm-up)

    def __init__(self, hparams: dict, params: dict):
        super().__init__(hparams, params)
        hp = self.hp
        if not 0 <= hp.reinit_fraction <= 1:
            raise ConfigError(f"methods.grad_reinit.reinit_fraction must be in [0, 1], got {hp.reinit_fraction}")
        if hp.kept_lr_factor < 0 or hp.gradient_batch_size < 1:
            raise ConfigError(f"methods.grad_reinit: need kept_lr_factor >= 0 and gradient_batch_size >= 1, got {hp.kept_lr_factor}, {hp.gradient_batch_size}")
        # Gradient scaling is a learning-rate factor only for SGD (Adam normalises it away).
        if self.fit_config().optimizer != "sgd" and hp.kept_lr_factor != 1:
            raise ConfigError(f"methods.grad_reinit.kept_lr_factor needs fit.optimizer 'sgd', got '{self.fit_config().optimizer}'")

    def reset_masks(self, models: ModelStack, data: UnlearnData, runtime: Runtime) -> dict[str, torch.Tensor]:
        """Per conv weight, [N, ...] True where the weight is re-initialised."""
        names = conv_weight_names(models.spec, self.name)
        grads = gradient_information(models, data, self.hp.gradient_batch_size, runtime)
        return smallest_fraction_mask({name: grads[name].abs() for name in names}, self.hp.reinit_fraction)

    def unlearn(self, models, data, runtime):
        masks = self.reset_masks(models, data, runtime)
        models = reinitialise(models, masks)
        kept = self.hp.kept_lr_factor
        grad_scale = {name: torch.full_like(value, kept) for name, value in models.params.items()}
        for name, mask in masks.items():
            grad_scale[name] = torch.where(mask, 1.0, grad_scale[name])
        streams = {"retain": self.retain_stream(data)}
        return fit(models, streams, cross_entropy_on("retain"), self.fit_config(), runtime, driver="retain", desc=self.name, grad_scale=grad_scale)
