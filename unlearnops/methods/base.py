"""The contract every unlearning method follows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from unlearnops.config import build_dataclass
from unlearnops.data import Part
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, LossFn, Monitor, Runtime, Stream, fit


@dataclass
class UnlearnData:
    """What a method may look at: retain, forget and validation data (never the test split)."""

    retain: Part
    forget: Part
    val: Part
    num_classes: int
    augment: bool


class Unlearner:
    """A method maps N copies of the original model to N unlearned models.

    `unlearn` receives the original replicated N times (`models.seeds[i]` is run i's seed) and
    returns the N unlearned models. N=1 is a single production unlearning run. Methods do
    not read files or log; the unlearn stage does that.
    """

    name: ClassVar[str]
    # A dataclass; its fields are exactly the keys of methods.<name>, typed: a `FitConfig` field
    # (fit: FitConfig) is built and checked from its nested mapping when the method is built.
    Hparams: ClassVar[type]

    def __init__(self, hparams: dict, params: dict):
        self.hp = build_dataclass(self.Hparams, hparams, f"methods.{self.name}")
        self.params = params
        # (desc, [N] epochs each model trained) of every fit through `self.fit`, in order: with
        # the stopping rule on, what each run actually needed.
        self.fit_epochs: list[tuple[str, torch.Tensor]] = []

    def unlearn(self, models: ModelStack, data: UnlearnData, runtime: Runtime) -> ModelStack:
        raise NotImplementedError

    # Helpers shared by the methods that fine-tune.
    def fit(self, data: UnlearnData, models: ModelStack, streams: dict[str, Stream], loss_fn: LossFn, cfg: FitConfig, runtime: Runtime, **options) -> ModelStack:
        """training.fit with the seed study's stopping rule available: when cfg.stop_patience > 0
        every model stops once its retain and validation accuracy have converged."""
        monitor = Monitor({"retain": (data.retain.x, data.retain.y), "val": (data.val.x, data.val.y)})
        models = fit(models, streams, loss_fn, cfg, runtime, monitor=monitor, **options)
        self.fit_epochs.append((options.get("desc", self.name), monitor.epochs))
        return models

    def retain_stream(self, data: UnlearnData, batch_size: int | None = None) -> Stream:
        return Stream(data.retain.x, data.retain.y, batch_size or self.hp.fit.batch_size, data.augment)

    def forget_stream(self, data: UnlearnData, batch_size: int) -> Stream:
        return Stream(data.forget.x, data.forget.y, batch_size, data.augment)
