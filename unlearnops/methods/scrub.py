"""SCRUB (Kurmanji et al. 2023, "Towards Unbounded Machine Unlearning").

Teacher = the original model, student = a copy of it. Every epoch is a min-step pass over
retain (alpha * KL(teacher || student) + gamma * cross-entropy); the first `msteps` epochs
each begin with a max-step pass over forget (maximise KL(teacher || student)). KL is taken
between temperature-softened outputs and scaled by T^2, as in the authors' DistillKL.
alpha and gamma follow the paper's names (alpha weighs the KL, gamma the cross-entropy).

At student == teacher the KL is at its minimum and its gradient is zero, so the first max-step
barely moves; the min-steps' cross-entropy separates student from teacher and later max-steps
act. Each pass is one engine `fit` call, so momentum and the lr schedule restart every pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearnops.config import ConfigError
from unlearnops.methods import register
from unlearnops.methods.base import UnlearnData, Unlearner
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, Runtime, fit


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened outputs, times T^2, averaged over the batch."""
    student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    # Written out rather than F.kl_div, which vmap runs model by model (no batching rule).
    return (teacher.exp() * (teacher - student)).sum(-1).mean() * temperature**2


def frozen_teacher(original: ModelStack, runtime: Runtime) -> nn.Module:
    """Model 0 of `original` in eval mode without gradients. Called inside the engine's vmapped
    loss, its unbatched weights broadcast over the student models' batches."""
    return original.module(0).to(runtime.device).requires_grad_(False)


def all_identical(models: ModelStack) -> bool:
    return all(torch.equal(v, v[:1].expand_as(v)) for v in {**models.params, **models.buffers}.values())


@register("scrub")
class Scrub(Unlearner):
    @dataclass
    class Hparams:
        temperature: float  # distillation temperature T
        alpha: float  # min-step weight of KL(teacher || student) on retain
        gamma: float  # min-step weight of cross-entropy on retain
        msteps: int  # the first msteps epochs each begin with a max-step pass over forget
        forget_batch_size: int  # batch size of the max-step passes
        fit: dict  # optimiser; fit.epochs = total epochs (min-step passes over retain)

    def __init__(self, hparams: dict, params: dict):
        super().__init__(hparams, params)
        hp = self.hp
        if hp.temperature <= 0 or hp.msteps < 0 or hp.forget_batch_size < 1:
            raise ConfigError(f"methods.scrub: need temperature > 0, msteps >= 0, forget_batch_size >= 1; got {hp.temperature}, {hp.msteps}, {hp.forget_batch_size}")
        self.fit_config()

    def max_step(self, students: ModelStack, teacher: nn.Module, data: UnlearnData, runtime: Runtime) -> ModelStack:
        """One pass over forget maximising KL(teacher || student)."""
        T = self.hp.temperature

        def loss(forward, batches):
            x, _ = batches["forget"]
            return -distill_kl(forward(x), teacher(x), T)

        cfg = dataclasses.replace(self.fit_config(), epochs=1, batch_size=self.hp.forget_batch_size)
        return fit(students, {"forget": self.forget_stream(data, cfg.batch_size)}, loss, cfg, runtime, driver="forget", desc=f"{self.name} max")

    def min_step(self, students: ModelStack, teacher: nn.Module, data: UnlearnData, runtime: Runtime) -> ModelStack:
        """One pass over retain minimising alpha * KL(teacher || student) + gamma * CE."""
        T, alpha, gamma = self.hp.temperature, self.hp.alpha, self.hp.gamma

        def loss(forward, batches):
            x, y = batches["retain"]
            logits = forward(x)
            return alpha * distill_kl(logits, teacher(x), T) + gamma * F.cross_entropy(logits, y)

        cfg: FitConfig = dataclasses.replace(self.fit_config(), epochs=1)
        return fit(students, {"retain": self.retain_stream(data)}, loss, cfg, runtime, driver="retain", desc=f"{self.name} min")

    def scrub(self, students: ModelStack, original: ModelStack, data: UnlearnData, runtime: Runtime) -> ModelStack:
        teacher = frozen_teacher(original, runtime)
        for epoch in range(self.fit_config().epochs):
            if epoch < self.hp.msteps:
                students = self.max_step(students, teacher, data, runtime)
            students = self.min_step(students, teacher, data, runtime)
        return students

    def unlearn(self, models, data, runtime):
        if self.hp.msteps > 0 and len(data.forget) == 0:
            raise ValueError("scrub's max-steps need a non-empty forget set")
        if all_identical(models):  # the usual case: N copies of one original, one teacher
            return self.scrub(models, models.select([0]), data, runtime)
        # Different starting models (e.g. a later stage of layered unlearning): each its own teacher.
        return ModelStack.concat([self.scrub(models.select([i]), models.select([i]), data, runtime) for i in range(models.n)])
