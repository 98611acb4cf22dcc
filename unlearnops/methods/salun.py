"""SalUn (Fan et al. 2024): random-label unlearning restricted to the salient weights.

The saliency of a weight is |d CE(forget) / d w| at the original model: the weights the
forget set pulls on hardest. Only the top `saliency_fraction` of them are trained
(`fit(..., grad_scale=mask)`); the rest keep the original's values (up to weight decay), so
the unlearning edits what encodes the forget set and leaves the rest of the model alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unlearnops.config import build_dataclass, choose
from unlearnops.data import Part
from unlearnops.methods import register
from unlearnops.methods.base import Unlearner
from unlearnops.methods.random_label import random_wrong_labels
from unlearnops.methods.weight_surgery import SCOPES, check_fraction, fraction_masks
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, Runtime, fit


def forget_gradient(models: ModelStack, forget: Part, runtime: Runtime) -> dict[str, torch.Tensor]:
    """Gradient of the mean cross-entropy on forget at model 0 (eval mode, so batch norm
    uses its running statistics), for every parameter, on the CPU."""
    model = models.module(0).to(runtime.device)
    names, params = zip(*model.named_parameters())
    grads = [torch.zeros_like(p) for p in params]
    for start in range(0, len(forget), runtime.eval_batch_size):
        x = forget.x[start : start + runtime.eval_batch_size].to(runtime.device)
        y = forget.y[start : start + runtime.eval_batch_size].to(runtime.device)
        batch_loss = F.cross_entropy(model(x), y, reduction="sum") / len(forget)
        for total, grad in zip(grads, torch.autograd.grad(batch_loss, params)):
            total += grad
    return {name: grad.cpu() for name, grad in zip(names, grads)}


@register("salun")
class SalUn(Unlearner):
    @dataclass
    class Hparams:
        saliency_fraction: float
        saliency_scope: str
        forget_weight: float
        forget_batch_size: int
        fit: dict

        def __post_init__(self):
            build_dataclass(FitConfig, self.fit, "methods.salun.fit")
            check_fraction(self.saliency_fraction, "methods.salun.saliency_fraction")
            choose(self.saliency_scope, SCOPES, "methods.salun.saliency_scope")

    def saliency_masks(self, models: ModelStack, forget: Part, runtime: Runtime) -> dict[str, torch.Tensor]:
        """Per parameter, [N, ...] booleans: True where the weight is salient (trained).
        Every run starts from the same original, so all N masks are equal."""
        scores = {name: grad.abs()[None] for name, grad in forget_gradient(models, forget, runtime).items()}
        masks = fraction_masks(scores, self.hp.saliency_fraction, self.hp.saliency_scope, largest=True)
        return {name: mask.expand(models.n, *mask.shape[1:]).clone() for name, mask in masks.items()}

    def unlearn(self, models, data, runtime):
        masks = self.saliency_masks(models, data.forget, runtime)
        weight, classes = self.hp.forget_weight, data.num_classes

        def loss(forward, batches):
            (xr, yr), (xf, yf) = batches["retain"], batches["forget"]
            return F.cross_entropy(forward(xr), yr) + weight * F.cross_entropy(forward(xf), random_wrong_labels(yf, classes))

        streams = {"retain": self.retain_stream(data), "forget": self.forget_stream(data, self.hp.forget_batch_size)}
        grad_scale = {name: mask.float() for name, mask in masks.items()}
        return fit(models, streams, loss, self.fit_config(), runtime, driver="retain", desc=self.name, grad_scale=grad_scale)
