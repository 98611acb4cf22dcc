"""NegGrad+ (Kurmanji et al. 2023): descend on retain and ascend on forget in the same step.

Follows meghdadk/SCRUB `large_scale_unlearning.ipynb`: `negative_grad` (alpha 0.95, plain SGD
lr 0.01 without momentum, 10 epochs; forget loader batch 512, retain loader batch 256) and the
`run_neggrad_epoch` it calls (every retain batch paired with the next batch of the cycled forget
loader; loss = alpha * CE(retain) - (1 - alpha) * CE(forget)).
Deviations: 2 epochs instead of 10 (params.yaml `methods.neggrad_plus.fit.epochs`), to fit the
time budget (0.2 x retraining's 15 epochs). Not reproduced (the shared engine has no such
modes): `run_neggrad_epoch` keeps the model in eval mode (BatchNorm on its running statistics)
and adds alpha * l2_penalty(model, original, args.weight_decay) to the loss; here BatchNorm
trains as in every other method and the penalty is left out (weight_decay 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from unlearnops.methods import register
from unlearnops.methods.base import Unlearner
from unlearnops.training import FitConfig


@register("neggrad_plus")
class NegGradPlus(Unlearner):
    @dataclass
    class Hparams:
        alpha: float  # weight of the retain loss; (1 - alpha) weighs the forget ascent
        forget_batch_size: int
        fit: FitConfig

    def unlearn(self, models, data, runtime):
        alpha = self.hp.alpha

        def loss(forward, batches):
            (xr, yr), (xf, yf) = batches["retain"], batches["forget"]
            return alpha * F.cross_entropy(forward(xr), yr) - (1 - alpha) * F.cross_entropy(forward(xf), yf)

        streams = {"retain": self.retain_stream(data), "forget": self.forget_stream(data, self.hp.forget_batch_size)}
        return self.fit(data, models, streams, loss, self.hp.fit, runtime, driver="retain", desc=self.name)
