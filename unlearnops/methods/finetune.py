"""Fine-tune on the retain set only (the competition starting kit's baseline)."""
from __future__ import annotations

from dataclasses import dataclass

from unlearnops.methods import register
from unlearnops.methods.base import Unlearner
from unlearnops.training import cross_entropy_on, fit


@register("finetune")
class Finetune(Unlearner):
    @dataclass
    class Hparams:
        fit: dict

    def unlearn(self, models, data, runtime):
        streams = {"retain": self.retain_stream(data)}
        return fit(models, streams, cross_entropy_on("retain"), self.fit_config(), runtime, driver="retain", desc=self.name)
