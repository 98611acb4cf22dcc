"""SCRUB (Kurmanji et al. 2023, "Towards Unbounded Machine Unlearning").

Follows meghdadk/SCRUB `large_scale_unlearning.ipynb` (its SCRUB cell and loop) with
`thirdparty/repdistiller/helper/loops.py` (`train_distill`) and `distiller_zoo/KD.py` (DistillKL).
Teacher = the original model, student = a copy of it. Epoch e (from 1) is a max-step pass over
forget (loss -KL(teacher || student)) when e <= msteps, then a min-step pass over retain
(gamma * cross-entropy + alpha * KL(teacher || student)). KL is taken between temperature-softened
outputs and scaled by T^2, as DistillKL does. ONE optimiser makes every step of every pass
(momentum carries over), at a constant lr: the notebook's decay epochs [3, 5, 9] are not reached
in its 3 epochs. Authors' values: SGD lr 5e-4, momentum 0.9, weight decay 5e-4, 3 epochs,
msteps 2, T 4, gamma 0.99, alpha 0.001, retain batch 128, forget batch 32.

At student == teacher the KL is at its minimum and its gradient is zero, so the first max-step
barely moves; the min-steps' cross-entropy separates student from teacher and later max-steps act.
Deviations are the params.yaml values that differ from the above (each with its reason there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unlearnops.config import ConfigError
from unlearnops.methods import register
from unlearnops.methods.base import UnlearnData, Unlearner
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, LossFn, Phase, Runtime, Stream, predict, steps_per_pass


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


# (part, x, positions) -> the teacher's logits on that batch of "retain" or "forget".
TeacherOutputs = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


def all_identical(models: ModelStack) -> bool:
    return all(torch.equal(v, v[:1].expand_as(v)) for v in {**models.params, **models.buffers}.values())


@register("scrub")
class Scrub(Unlearner):
    @dataclass
    class Hparams:
        temperature: float  # distillation temperature T
        alpha: float  # min-step weight of KL(teacher || student) on retain
        gamma: float  # min-step weight of cross-entropy on retain
        msteps: int  # epochs 1..msteps each begin with a max-step pass over forget
        forget_batch_size: int  # batch size of the max-step passes
        fit: FitConfig  # the one optimiser of all passes; epochs = min-step passes over retain

    def __init__(self, hparams: dict, params: dict):
        super().__init__(hparams, params)
        hp = self.hp
        if hp.temperature <= 0 or hp.msteps < 0 or hp.forget_batch_size < 1:
            raise ConfigError(f"methods.scrub: need temperature > 0, msteps >= 0, forget_batch_size >= 1; got {hp.temperature}, {hp.msteps}, {hp.forget_batch_size}")

    def teacher_outputs(self, original: ModelStack, data: UnlearnData, runtime: Runtime) -> TeacherOutputs:
        """The teacher's logits on a batch, looked up from `positions` (the sample indices the
        streams carry as labels). Without augmentation they are computed once, before training
        (the frozen teacher sees the same images every epoch: a third less compute per step);
        with augmentation the teacher runs on every augmented batch."""
        if data.augment:
            teacher = frozen_teacher(original, runtime)
            return lambda part, x, positions: teacher(x)
        logits = {part: predict(original.select([0]), getattr(data, part).x, runtime)[0].to(runtime.device) for part in ("retain", "forget")}
        return lambda part, x, positions: logits[part][positions]

    def max_loss(self, teacher: TeacherOutputs) -> LossFn:
        """The max-step loss on a forget batch: -KL(teacher || student)."""

        def loss(forward, batches):
            x, positions = batches["forget"]
            return -distill_kl(forward(x), teacher("forget", x, positions), self.hp.temperature)

        return loss

    def min_loss(self, teacher: TeacherOutputs, retain_labels: torch.Tensor) -> LossFn:
        """The min-step loss on a retain batch: gamma * CE + alpha * KL(teacher || student)."""
        hp = self.hp

        def loss(forward, batches):
            x, positions = batches["retain"]
            logits = forward(x)
            return hp.gamma * F.cross_entropy(logits, retain_labels[positions]) + hp.alpha * distill_kl(logits, teacher("retain", x, positions), hp.temperature)

        return loss

    def streams(self, data: UnlearnData) -> dict[str, Stream]:
        """Forget and retain batches whose labels are the samples' positions (see teacher_outputs)."""
        positions = lambda part: torch.arange(len(part))  # noqa: E731
        return {
            "forget": Stream(data.forget.x, positions(data.forget), self.hp.forget_batch_size, data.augment),
            "retain": Stream(data.retain.x, positions(data.retain), self.hp.fit.batch_size, data.augment),
        }

    def schedule(self, streams: dict[str, Stream]) -> list[list[str]]:
        """The notebook's loop, per epoch: epoch e (from 1) is a max pass over forget if e <= msteps, then a min pass over retain."""
        max_pass, min_pass = ["max"] * steps_per_pass(streams["forget"]), ["min"] * steps_per_pass(streams["retain"])
        return [(max_pass if epoch <= self.hp.msteps else []) + min_pass for epoch in range(1, self.hp.fit.epochs + 1)]

    def scrub(self, students: ModelStack, original: ModelStack, data: UnlearnData, runtime: Runtime) -> ModelStack:
        teacher = self.teacher_outputs(original, data, runtime)
        streams = self.streams(data)
        phases = {"max": Phase(self.max_loss(teacher), ("forget",)), "min": Phase(self.min_loss(teacher, data.retain.y.to(runtime.device)), ("retain",))}
        return self.fit(data, students, streams, phases, self.hp.fit, runtime, plan=self.schedule(streams), desc=self.name)

    def unlearn(self, models, data, runtime):
        if self.hp.msteps > 0 and len(data.forget) == 0:
            raise ValueError("scrub's max-steps need a non-empty forget set")
        if all_identical(models):  # the usual case: N copies of one original, one teacher
            return self.scrub(models, models.select([0]), data, runtime)
        # Different starting models (e.g. a later stage of layered unlearning): each its own teacher.
        return ModelStack.concat([self.scrub(models.select([i]), models.select([i]), data, runtime) for i in range(models.n)])
