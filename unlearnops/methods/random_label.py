"""Random labels: fit the forget set to random wrong labels while fitting retain as usual."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unlearnops.methods import register
from unlearnops.methods.base import Unlearner
from unlearnops.training import fit


def random_wrong_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A uniformly random label different from y, drawn afresh at every call."""
    return (y + torch.randint_like(y, 1, num_classes)) % num_classes


@register("random_label")
class RandomLabel(Unlearner):
    @dataclass
    class Hparams:
        forget_weight: float  # weight of the random-label loss on forget
        forget_batch_size: int
        fit: dict

    def unlearn(self, models, data, runtime):
        weight, classes = self.hp.forget_weight, data.num_classes

        def loss(forward, batches):
            (xr, yr), (xf, yf) = batches["retain"], batches["forget"]
            return F.cross_entropy(forward(xr), yr) + weight * F.cross_entropy(forward(xf), random_wrong_labels(yf, classes))

        streams = {"retain": self.retain_stream(data), "forget": self.forget_stream(data, self.hp.forget_batch_size)}
        return fit(models, streams, loss, self.fit_config(), runtime, driver="retain", desc=self.name)
