"""KL-to-uniform + contrastive forgetting (NeurIPS 2023 competition, 1st place).

1. `uniform`: one pass over forget minimising KL(p(x) || u) (u uniform), so forget predictions
   lose their confidence. `uniform_kl: uniform_to_p` minimises KL(u || p(x)) instead (cross-entropy
   to uniform labels): KL(p || u) = log C - entropy has a vanishing gradient where p is nearly
   one-hot, so on a confident model one pass barely moves it; KL(u || p) keeps its gradient.
2. `rounds` times: a contrastive pass over forget, then a cross-entropy pass over retain.
   Contrastive loss per forget batch: out_f = outputs of the forget batch and of its augmented
   view (the positives: both views get the same push), out_r = outputs of a retain batch (the
   negatives, detached);  loss = -mean(log_softmax(out_f @ out_r^T / T)). It is smallest when a
   forget output is equally similar to every retain output, i.e. carries no class evidence.
   The retain pass repairs what the forget pass damaged.
3. `fit`: a final cross-entropy fine-tuning on retain.

Each pass is one engine `fit` call: momentum and the lr schedule restart every pass.
The augmented view is a small random shift (zero padding) plus Gaussian noise, drawn per image
and per model; unlike crop + flip at 32x32 it suits any image size, 8x8 digits included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unlearnops.config import ConfigError, choose
from unlearnops.methods import register
from unlearnops.methods.base import UnlearnData, Unlearner
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, Runtime, Stream, cross_entropy_on, fit


def shift_and_noise(x: torch.Tensor, max_shift: int, noise_std: float) -> torch.Tensor:
    """x [B, C, H, W] shifted by up to max_shift pixels each way (zero fill) plus N(0, noise_std^2).
    Uses the global random stream, so inside the engine's loss every model draws its own."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    shifted = padded[batch, chan, rows, cols]
    return shifted + noise_std * torch.randn_like(shifted)


UNIFORM_KL = ("p_to_uniform", "uniform_to_p")


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(softmax(logits) || u) = log C - entropy."""
    log_p = F.log_softmax(logits, dim=-1)
    return (log_p.exp() * log_p).sum(-1).mean() + math.log(logits.shape[-1])


def kl_from_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(u || softmax(logits)) = -mean log p - log C."""
    return -F.log_softmax(logits, dim=-1).mean() - math.log(logits.shape[-1])


@register("kl_contrastive")
class KLContrastive(Unlearner):
    @dataclass
    class Hparams:
        uniform_kl: str  # p_to_uniform: KL(p || u) | uniform_to_p: KL(u || p)
        temperature: float  # T of the contrastive loss
        rounds: int  # contrastive forget pass + retain pass, repeated
        negatives_batch_size: int  # retain samples per forget batch (the negatives)
        max_shift: int  # augmented view: shift of up to this many pixels
        noise_std: float  # augmented view: std of the added Gaussian noise
        uniform: dict  # step 1: pass(es) over forget toward uniform outputs
        contrast: dict  # step 2: each contrastive pass over forget (the write-up: cosine lr)
        retain_round: dict  # step 2: each cross-entropy pass over retain
        fit: dict  # step 3: final cross-entropy fine-tuning on retain

    def __init__(self, hparams: dict, params: dict):
        super().__init__(hparams, params)
        hp = self.hp
        choose(hp.uniform_kl, UNIFORM_KL, "methods.kl_contrastive.uniform_kl")
        if hp.temperature <= 0 or hp.rounds < 0 or hp.negatives_batch_size < 1 or hp.max_shift < 0 or hp.noise_std < 0:
            raise ConfigError(
                "methods.kl_contrastive: need temperature > 0, rounds >= 0, negatives_batch_size >= 1, max_shift >= 0, "
                f"noise_std >= 0; got {hp.temperature}, {hp.rounds}, {hp.negatives_batch_size}, {hp.max_shift}, {hp.noise_std}"
            )
        for key in ("uniform", "contrast", "retain_round", "fit"):
            self.fit_config(key)  # bad optimiser settings fail before any training

    def push_to_uniform(self, models: ModelStack, data: UnlearnData, runtime: Runtime) -> ModelStack:
        """Step 1: forget outputs toward the uniform distribution."""
        cfg = self.fit_config("uniform")
        divergence = kl_to_uniform if self.hp.uniform_kl == "p_to_uniform" else kl_from_uniform

        def loss(forward, batches):
            return divergence(forward(batches["forget"][0]))

        return fit(models, {"forget": self.forget_stream(data, cfg.batch_size)}, loss, cfg, runtime, driver="forget", desc=f"{self.name} uniform")

    def contrastive_pass(self, models: ModelStack, data: UnlearnData, runtime: Runtime) -> ModelStack:
        """Step 2a: forget outputs (both views) pushed to be equally similar to all retain outputs."""
        cfg, hp = self.fit_config("contrast"), self.hp

        def loss(forward, batches):
            xf, xr = batches["forget"][0], batches["negatives"][0]
            out_f = forward(torch.cat([xf, shift_and_noise(xf, hp.max_shift, hp.noise_std)]))
            out_r = forward(xr).detach()
            return -F.log_softmax(out_f @ out_r.T / hp.temperature, dim=-1).mean()

        streams = {
            "forget": self.forget_stream(data, cfg.batch_size),
            "negatives": Stream(data.retain.x, data.retain.y, hp.negatives_batch_size, data.augment),
        }
        return fit(models, streams, loss, cfg, runtime, driver="forget", desc=f"{self.name} contrast")

    def retain_pass(self, models: ModelStack, data: UnlearnData, runtime: Runtime, key: str) -> ModelStack:
        """Cross-entropy on retain with the optimiser settings of block `key`."""
        cfg: FitConfig = self.fit_config(key)
        return fit(models, {"retain": self.retain_stream(data, cfg.batch_size)}, cross_entropy_on("retain"), cfg, runtime, driver="retain", desc=f"{self.name} {key}")

    def unlearn(self, models, data, runtime):
        if len(data.forget) == 0:
            raise ValueError("kl_contrastive needs a non-empty forget set")
        models = self.push_to_uniform(models, data, runtime)
        for _ in range(self.hp.rounds):
            models = self.contrastive_pass(models, data, runtime)
            models = self.retain_pass(models, data, runtime, "retain_round")
        return self.retain_pass(models, data, runtime, "fit")
