"""Fine-tune on the retain set only: the NeurIPS 2023 competition starting kit's baseline.

Follows unlearning-challenge/starting-kit `unlearning-CIFAR10.ipynb` (its `unlearning`, also in
`functions/tools.py`): cross-entropy on retain, SGD lr 0.1, momentum 0.9, weight decay 5e-4,
cosine schedule, 5 epochs. Deviations (params.yaml `methods.finetune.fit`): 2 epochs, to fit the
time budget (0.2 x retraining's 15 epochs); the cosine is stepped per batch, not per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

from unlearnops.methods import register
from unlearnops.methods.base import Unlearner
from unlearnops.training import cross_entropy_on


@register("finetune")
class Finetune(Unlearner):
    @dataclass
    class Hparams:
        fit: dict

    def unlearn(self, models, data, runtime):
        streams = {"retain": self.retain_stream(data)}
        # Through Unlearner.fit: `stop_patience` in methods.finetune.fit turns on the seed study's stopping rule.
        return self.fit(data, models, streams, cross_entropy_on("retain"), self.fit_config(), runtime, driver="retain", desc=self.name)
