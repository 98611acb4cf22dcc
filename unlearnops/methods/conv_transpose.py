"""Conv kernel transposition (NeurIPS 2023 unlearning competition, 5th place).

Swapping the two spatial axes of every conv kernel keeps each kernel's weights (its
norm, its channel structure) but scrambles the spatial features the network learned, so
the specific memories of the forget set break; fine-tuning on retain rebuilds what the
retain data supports.
"""
from __future__ import annotations

from dataclasses import dataclass

from unlearnops.config import build_dataclass
from unlearnops.methods import register
from unlearnops.methods.base import Unlearner
from unlearnops.methods.weight_surgery import conv_weight_names, transpose_conv_kernels
from unlearnops.training import FitConfig, cross_entropy_on, fit


@register("conv_transpose")
class ConvTranspose(Unlearner):
    @dataclass
    class Hparams:
        fit: dict

        def __post_init__(self):
            build_dataclass(FitConfig, self.fit, "methods.conv_transpose.fit")

    def transpose(self, models):
        return transpose_conv_kernels(models, conv_weight_names(models.spec, self.name))

    def unlearn(self, models, data, runtime):
        streams = {"retain": self.retain_stream(data)}
        return fit(self.transpose(models), streams, cross_entropy_on("retain"), self.fit_config(), runtime, driver="retain", desc=self.name)
