"""NegGrad+: descend on retain and ascend on forget in the same step, weighted by alpha."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from unlearnops.methods import register
from unlearnops.methods.base import Unlearner
from unlearnops.training import fit


@register("neggrad_plus")
class NegGradPlus(Unlearner):
    @dataclass
    class Hparams:
        alpha: float  # weight of the retain loss; (1 - alpha) weighs the forget ascent
        forget_batch_size: int
        fit: dict

    def unlearn(self, models, data, runtime):
        alpha = self.hp.alpha

        def loss(forward, batches):
            (xr, yr), (xf, yf) = batches["retain"], batches["forget"]
            return alpha * F.cross_entropy(forward(xr), yr) - (1 - alpha) * F.cross_entropy(forward(xf), yf)

        streams = {"retain": self.retain_stream(data), "forget": self.forget_stream(data, self.hp.forget_batch_size)}
        return fit(models, streams, loss, self.fit_config(), runtime, driver="retain", desc=self.name)
