"""The contract every unlearning method follows."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, ClassVar

import torch

from unlearnops.config import build_dataclass
from unlearnops.data import Part
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, LossFn, Monitor, Phase, Runtime, StoppingRule, Stream, fit


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
        # The seed of a step that every run of a stage shares (conv_transpose_pseudo's quick model):
        # run 0's seed of the whole stage. A chunk of a stage's runs (unlearnops/chunks.py) sets it,
        # so every chunk takes the step the unchunked stage takes; None: models.seeds[0].
        self.shared_seed: int | None = None

    def shared_step_seed(self, models: ModelStack) -> int:
        return models.seeds[0] if self.shared_seed is None else self.shared_seed

    def unlearn(self, models: ModelStack, data: UnlearnData, runtime: Runtime) -> ModelStack:
        raise NotImplementedError

    # Helpers shared by the methods that fine-tune.
    def fit(self, data: UnlearnData, models: ModelStack, streams: dict[str, Stream], loss: LossFn | dict[str, Phase], cfg: FitConfig, runtime: Runtime, **options) -> ModelStack:
        """training.fit with the seed study's stopping rule available: when cfg.stop_patience > 0
        every model stops at the end of the epoch at which its retain and validation accuracy
        have converged. Every method's training goes through here."""
        monitor = Monitor({"retain": (data.retain.x, data.retain.y), "val": (data.val.x, data.val.y)})
        models = fit(models, streams, loss, cfg, runtime, monitor=monitor, **options)
        self.fit_epochs.append((options.get("desc", self.name), monitor.epochs))
        return models

    def rounds(self, data: UnlearnData, models: ModelStack, count: int, one_round: Callable[[int, ModelStack], ModelStack], cfg: FitConfig, runtime: Runtime, desc: str) -> ModelStack:
        """`count` rounds, models = one_round(r, models), for a method whose epochs are rounds of
        several fits (kl_contrastive). With cfg.stop_patience > 0 the stopping rule acts at
        round granularity: a run stops at the end of the round at which its retain and
        validation accuracy have converged (later rounds leave it as it was), and the rounds
        end once every run has stopped."""
        rule = None
        if cfg.stop_patience:
            rule = StoppingRule(replace(cfg, epochs=count), {"retain": (data.retain.x, data.retain.y), "val": (data.val.x, data.val.y)}, models, models.params, models.buffers, runtime)
        for r in range(count):
            models = one_round(r, models)
            if rule is not None:
                models = ModelStack(models.spec, {k: v.clone() for k, v in models.params.items()}, {k: v.clone() for k, v in models.buffers.items()}, models.seeds)
                if rule.after_epoch(r + 1, models.params, models.buffers):
                    break
        self.fit_epochs.append((desc, rule.epochs if rule is not None else torch.full((models.n,), count)))
        return models

    def retain_stream(self, data: UnlearnData, batch_size: int | None = None) -> Stream:
        return Stream(data.retain.x, data.retain.y, batch_size or self.hp.fit.batch_size, data.augment)

    def forget_stream(self, data: UnlearnData, batch_size: int) -> Stream:
        return Stream(data.forget.x, data.forget.y, batch_size, data.augment)
