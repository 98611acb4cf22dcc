"""MUSO: Machine Unlearning by Setting Optimal labels (arXiv 2410.08557).

Linear form (the paper's theorem). In an over-parameterised linear model trained by gradient
descent on squared loss from w0, the retrained model is the interpolant of the retain set
closest to w0. Relabel the forget set with that model's predictions,
    y_u = Z_u Z_r^T (Z_r Z_r^T + eps I)^-1 (y_r - Z_r w0) + Z_u w0,
and the same gradient descent on [retain; forget] with labels [y_r; y_u] reaches the
retrained parameters exactly (up to eps and convergence): `muso_relabel`, `gradient_descent`.

Network form (the registry method `muso`): the same idea on the last linear layer, with the
network's penultimate features as Z, alternated with training the whole network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from unlearnops.config import ConfigError
from unlearnops.methods import register
from unlearnops.methods.base import Unlearner
from unlearnops.nets import build_model, head_name
from unlearnops.stack import ModelStack
from unlearnops.training import Stream, cross_entropy_on, fit, penultimate_features


# ---------------------------------------------------------------- the linear form


def muso_relabel(z_retain: torch.Tensor, y_retain: torch.Tensor, z_forget: torch.Tensor, w0: torch.Tensor, eps: float) -> torch.Tensor:
    """The forget labels that make training on [retain; forget] reach the retrained model.

    z_*: feature matrices [n, D]; y_retain [n_r] (regression) or [n_r, C] (e.g. one-hot);
    w0: initial weights [D] or [D, C]. Returns y_u shaped like y_retain's rows."""
    gram = z_retain @ z_retain.T + eps * torch.eye(len(z_retain), dtype=z_retain.dtype)
    return z_forget @ z_retain.T @ torch.linalg.solve(gram, y_retain - z_retain @ w0) + z_forget @ w0


def gradient_descent(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """Full-batch gradient descent on the squared loss ||z w - y||^2 / (2n) from w (the
    optimiser of the theorem); from w it converges to the interpolant closest to w."""
    for _ in range(steps):
        w = w - lr * z.T @ (z @ w - y) / len(z)
    return w


def parameter_gap(w_retrained: torch.Tensor, w_unlearned: torch.Tensor) -> float:
    """The paper's distance to the retrained model: ||w_r - w_u||^2 / (2D)."""
    return float((w_retrained - w_unlearned).pow(2).sum() / (2 * w_retrained.shape[0]))


# ---------------------------------------------------------------- the network form


def with_ones(z: torch.Tensor) -> torch.Tensor:
    """Features with a ones column, so a [d + 1, C] matrix holds a linear layer's weight and bias."""
    return torch.cat([z, torch.ones_like(z[..., :1])], dim=-1)


def head_matrix(stack: ModelStack) -> torch.Tensor:
    """Each model's last linear layer as a [N, d + 1, C] matrix: weight^T with the bias as last row."""
    head = head_name(build_model(stack.spec))
    weight, bias = stack.params[f"{head}.weight"], stack.params[f"{head}.bias"]
    return torch.cat([weight.transpose(1, 2), bias[:, None, :]], dim=1)


def project(z: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """P v with P = Z^T (Z Z^T + eps I)^-1 Z, batched over models (z [N, m, d], v [N, d, C]).

    For m > d the identical (push-through identity) (Z^T Z + eps I)^-1 Z^T Z v is solved
    instead: a d x d system rather than m x m. Float64: eps goes down to 1e-6."""
    z, v = z.double(), v.double()
    m, d = z.shape[-2:]
    if m <= d:
        gram = z @ z.mT + eps * torch.eye(m, dtype=z.dtype)
        return z.mT @ torch.linalg.solve(gram, z @ v)
    gram = z.mT @ z + eps * torch.eye(d, dtype=z.dtype)
    return torch.linalg.solve(gram, z.mT @ (z @ v))


def forget_targets(phi_current: torch.Tensor, phi_original: torch.Tensor, z_retain: torch.Tensor, w0: torch.Tensor, w_p: torch.Tensor, eps: float) -> torch.Tensor:
    """MUSO's forget labels per model: argmax(phi_current R - phi_original w_p), with
    R = P (w_p - w0) + w0 + w_p, exactly as the reference gives it.

    Why the formula is kept as written: w0 + P (w_p - w0) is the linear form's retrained
    head (the retain interpolant closest to w0 when the original fits retain), and the extra
    + w_p / - phi_original w_p pair adds phi_current w_p - phi_original w_p, the change of the
    original head's outputs as the features drift. Before any training (phi_current =
    phi_original) the targets are exactly the linear form's relabelling; tests check this.

    phi_*: [N or 1, n_f, d + 1]; z_retain [N, m, d + 1]; w0, w_p [N, d + 1, C]. Returns [N, n_f].
    """
    r = project(z_retain, w_p - w0, eps) + w0.double() + w_p.double()
    scores = phi_current.double() @ r - phi_original.double() @ w_p.double()
    return scores.argmax(-1)


def cosine_ramp(start: float, end: float, epoch: int, epochs: int) -> float:
    """start at the first epoch, end at the last, cosine in between."""
    progress = epoch / (epochs - 1) if epochs > 1 else 0.0
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


@register("muso")
class Muso(Unlearner):
    """The network form. After `unlearn`, `forget_labels[e]` holds epoch e's forget labels
    ([N, n_forget], run i in row i), for inspection."""

    @dataclass
    class Hparams:
        eps_start: float  # ridge of the projector at the first epoch ...
        eps_end: float  # ... ramped (cosine) to this at the last
        # Fraction of retain rows (drawn per run and epoch) spanning the projector. The reference
        # down-samples "when rows exceed 2 * keep_ratio * N_r", which holds for every keep_ratio
        # below 1/2, so that condition is no separate knob; keep_ratio 1 uses every row.
        keep_ratio: float
        fit: dict  # optimiser of the CE steps on [retain; relabelled forget]

    def unlearn(self, models, data, runtime):
        if not 0 < self.hp.keep_ratio <= 1:
            raise ConfigError(f"methods.muso.keep_ratio must be in (0, 1], got {self.hp.keep_ratio}")
        cfg = self.fit_config()
        n_retain = len(data.retain)
        n_rows = max(1, round(self.hp.keep_ratio * n_retain))
        w_p = head_matrix(models)
        w0 = head_matrix(ModelStack.fresh(models.spec, models.seeds))  # a random-init head per run
        # The N models are copies of one original: its forget features are computed once.
        phi_original = with_ones(penultimate_features(models.select([0]), data.forget.x, runtime))
        gens = [torch.Generator().manual_seed(seed) for seed in models.seeds]
        x = torch.cat([data.retain.x, data.forget.x])
        retain_labels = data.retain.y.expand(models.n, n_retain)
        current, self.forget_labels = models, []
        for epoch in range(cfg.epochs):
            eps = cosine_ramp(self.hp.eps_start, self.hp.eps_end, epoch, cfg.epochs)
            rows = torch.stack([torch.randperm(n_retain, generator=g)[:n_rows] for g in gens])
            z_retain = with_ones(penultimate_features(current, data.retain.x, runtime, rows))
            phi_current = with_ones(penultimate_features(current, data.forget.x, runtime))
            targets = forget_targets(phi_current, phi_original, z_retain, w0, w_p, eps)
            self.forget_labels.append(targets)
            # One pass over [retain; forget] with per-run labels: true labels on retain, MUSO's
            # on forget. A fresh optimiser each epoch, since the forget labels change.
            stream = Stream(x, torch.cat([retain_labels, targets], dim=1), cfg.batch_size, data.augment)
            current = fit(current, {"train": stream}, cross_entropy_on("train"), replace(cfg, epochs=1), runtime, driver="train", desc=f"{self.name} epoch {epoch + 1}")
        return current
