"""Conv kernel transposition (NeurIPS 2023 unlearning competition, 5th place).

Follows xcadet/deepunlearn munl/unlearning/kgltop5.py (the seed study's re-implementation):
swap the two spatial axes of every Conv2d kernel (weight.swapaxes(2, 3); 1x1 kernels are
unchanged), then fine-tune on retain with plain cross-entropy (SGD, cosine schedule). The
transposition keeps each kernel's weights but scrambles the spatial features the network
learned, so its specific memories of the forget set break; BatchNorm absorbs the shock and the
fine-tuning rebuilds what retain supports. (Without BatchNorm, e.g. `small_cnn`, the
transposed network is confidently wrong and the authors' lr does not bring it back.)

Deviations (each a param): the authors' CosineAnnealingLR steps per epoch, the engine's cosine
per step. `retain_fraction` (authors 1.0): each epoch visits that fraction of retain (each
model its own random part, unlearnops/methods/retain_passes.py), so the authors' 3 epochs fit
the time budget (with full epochs the method takes 0.21 of the default retrain's CPU time).
`fit.lr` 0.05 (authors 0.001): their lr is set for ~770 steps per CIFAR-10 epoch, digits has 20
(16 here); test accuracy was 0.68 at 0.001 and 0.94 at 0.01 (retrain 0.99).
"""
from __future__ import annotations

from dataclasses import dataclass

from unlearnops.methods import register
from unlearnops.methods.base import Unlearner
from unlearnops.methods.retain_passes import check_retain_fraction, retain_steps
from unlearnops.methods.weight_surgery import conv_weight_names, transpose_conv_kernels
from unlearnops.training import FitConfig, cross_entropy_on


@register("conv_transpose")
class ConvTranspose(Unlearner):
    @dataclass
    class Hparams:
        retain_fraction: float  # share of retain each epoch visits
        fit: FitConfig

        def __post_init__(self):
            check_retain_fraction(self.retain_fraction, "methods.conv_transpose.retain_fraction")

    def transpose(self, models):
        return transpose_conv_kernels(models, conv_weight_names(models.spec, self.name))

    def unlearn(self, models, data, runtime):
        cfg = self.hp.fit
        steps = retain_steps(len(data.retain), cfg.batch_size, self.hp.retain_fraction)
        return self.fit(data, self.transpose(models), {"retain": self.retain_stream(data)}, cross_entropy_on("retain"), cfg, runtime, driver="retain", steps_per_epoch=steps, desc=self.name)
