"""A-AMU: accelerated approximate unlearning by distribution matching (arXiv 2507.09786).

Follows algebraicdianuj/DC_Unlearning `unlearn_methods/accelerated_cf.py`
(`Accelerated_CF_Unlearner`). Per retain batch B the loss is
    mean_i(CE_i(B)^2) + lambda * MMD(T(l_unseen), T(l_forget)),
where l are per-sample cross-entropy losses of |F| forget samples and of |F| unseen samples
(|F| = sample_factor * |B|, at most the forget set), the unseen losses constants. Matching the
two loss distributions makes forget samples look unseen to a membership-inference attacker.
T maps losses to a common scale: log1p, a soft empirical CDF, the probit, a clamp to [-K, K].

Deviations: the unseen samples come from the VALIDATION split (methods never see test; the
authors draw from their held-out test split), one of the same class for each forget sample (the
authors draw uniformly among the held-out samples whose class occurs in the forget sample); the
soft CDF is kept in [cdf_margin, 1 - cdf_margin] so the probit stays finite (the authors let the
probit of 1 be infinite and rely on the clamp).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unlearnops.methods import register
from unlearnops.methods.base import Unlearner
from unlearnops.training import FitConfig


def soft_cdf(values: torch.Tensor, sharpness: float, margin: float) -> torch.Tensor:
    """F_i = mean_j sigmoid(k relu(v_i - v_j)): a differentiable empirical CDF of `values`
    within itself, kept in [margin, 1 - margin] so its probit is finite."""
    cdf = torch.sigmoid(sharpness * F.relu(values[:, None] - values[None, :])).mean(1)
    return cdf.clamp(margin, 1 - margin)


def loss_transform(losses: torch.Tensor, sharpness: float, cdf_margin: float, clip: float) -> torch.Tensor:
    """T(l): log1p -> soft empirical CDF -> probit -> clamp to [-clip, clip]."""
    return torch.special.ndtri(soft_cdf(torch.log1p(losses), sharpness, cdf_margin)).clamp(-clip, clip)


def gaussian_mmd(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """Squared maximum mean discrepancy between two samples of scalars, Gaussian kernel
    (biased estimator: zero for identical samples, positive otherwise)."""
    kernel = lambda u, v: torch.exp(-((u[:, None] - v[None, :]) ** 2) / (2 * sigma**2)).mean()  # noqa: E731
    return kernel(a, a) + kernel(b, b) - 2 * kernel(a, b)


class SameClassSampler:
    """Draws, for each label, a random validation sample of that label (any validation sample
    when the validation split has none of it). Works inside vmap: each model draws its own."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        self.order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=num_classes)
        starts = torch.cumsum(counts, 0) - counts
        missing = counts == 0
        self.starts = torch.where(missing, 0, starts)
        self.counts = torch.where(missing, len(labels), counts)

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        offset = (torch.rand(labels.shape, device=labels.device) * self.counts[labels]).long()
        return self.order[self.starts[labels] + offset]


@register("a_amu")
class AAmu(Unlearner):
    @dataclass
    class Hparams:
        lam: float  # weight of the MMD term (the paper's lambda)
        sharpness: float  # k of the soft CDF
        clip: float  # K: the probit is clamped to [-K, K]
        cdf_margin: float  # the soft CDF is kept in [margin, 1 - margin] before the probit
        sigma: float  # bandwidth of the MMD's Gaussian kernel
        sample_factor: int  # forget and unseen samples per step = sample_factor * retain batch
        fit: FitConfig

    def unlearn(self, models, data, runtime):
        hp, cfg = self.hp, self.hp.fit
        device = runtime.device
        val_x, val_y = data.val.x.to(device), data.val.y.to(device)
        sampler = SameClassSampler(val_y, data.num_classes)
        transform = lambda losses: loss_transform(losses, hp.sharpness, hp.cdf_margin, hp.clip)  # noqa: E731

        def loss(forward, batches):
            (xr, yr), (xf, yf) = batches["retain"], batches["forget"]
            unseen = sampler(yf)
            forget_losses = F.cross_entropy(forward(xf), yf, reduction="none")
            unseen_losses = F.cross_entropy(forward(val_x[unseen]), val_y[unseen], reduction="none").detach()
            mmd = gaussian_mmd(transform(unseen_losses), transform(forget_losses), hp.sigma)
            return F.cross_entropy(forward(xr), yr, reduction="none").pow(2).mean() + hp.lam * mmd

        streams = {"retain": self.retain_stream(data), "forget": self.forget_stream(data, hp.sample_factor * cfg.batch_size)}
        return self.fit(data, models, streams, loss, cfg, runtime, driver="retain", desc=self.name)
