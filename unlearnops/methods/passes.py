"""Consecutive passes with one optimiser, as the authors of SCRUB and SalUn write their loops.

Their epochs are sequences of passes over different data (SalUn: a pass over forget with random
labels, then a pass over retain; SCRUB: a max-step pass over forget, then a min-step pass over
retain), and ONE optimiser makes every step, so momentum and the learning-rate schedule carry
over from pass to pass. `fit_passes` runs such a schedule as a single engine `fit`: every engine
epoch is one step (the driver is a one-item stream), and the epoch hook picks the next step's
pass. `after_step` sees the live models after every step (SalUn restores its frozen weights there,
MUSO relabels forget). Under torch.compile (CUDA) the pass name is a guarded Python value: each
pass's loss compiles once.

Each pass draws its batches from its own shuffled stream. The engine draws a batch from every
stream at every step, so a stream keeps moving while another pass runs: a pass sees consecutive
batches of its shuffled stream, not necessarily each sample exactly once.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, LossFn, Runtime, Stream, fit

# Called after every step with (steps done so far, which models of the stack, those live models).
StepHook = Callable[[int, slice, ModelStack], None]


def steps_per_pass(stream: Stream) -> int:
    """Steps of one pass over `stream` (the last batch may be smaller)."""
    return math.ceil(len(stream) / min(stream.batch_size, len(stream)))


def fit_passes(
    models: ModelStack,
    streams: dict[str, Stream],
    losses: dict[str, LossFn],
    schedule: list[str],
    cfg: FitConfig,
    runtime: Runtime,
    *,
    desc: str,
    grad_scale: dict[str, torch.Tensor] | None = None,
    after_step: StepHook | None = None,
) -> ModelStack:
    """Train with one optimiser for len(schedule) steps; step i uses the loss `losses[schedule[i]]`.

    `cfg.epochs` is ignored (the schedule sets the number of steps); the lr schedule of `cfg`
    spans all the steps."""
    if not schedule:
        return models
    current = {"pass": schedule[0]}

    def loss(forward, batches):
        return losses[current["pass"]](forward, batches)

    def next_step(step: int, index: slice, live: ModelStack) -> None:
        if after_step is not None:
            after_step(step, index, live)
        # After the last step the schedule wraps around: the next chunk of models starts afresh.
        current["pass"] = schedule[step % len(schedule)]

    one_step = Stream(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), batch_size=1)
    return fit(
        models,
        {**streams, "step": one_step},
        loss,
        replace(cfg, epochs=len(schedule)),
        runtime,
        driver="step",
        desc=desc,
        grad_scale=grad_scale,
        on_epoch_end=next_step,
    )
