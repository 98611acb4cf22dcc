"""Architectures, built from a plain spec dict so a checkpoint can rebuild its model."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from unlearnops.config import choose


def small_cnn(in_channels: int, num_classes: int, image_size: int, width: int = 32) -> nn.Module:
    """Three 3x3 convs and a linear head; no batch norm, so it batches under torch.func.vmap."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def small_resnet(in_channels: int, num_classes: int, image_size: int, widths: tuple[int, ...] = (16, 32, 64)) -> nn.Module:
    """A small ResNet with BatchNorm: a 3x3 stem, then one torchvision BasicBlock per width
    (stride 2 from the second on), global average pooling and a linear head.

    The competition's methods were written for ResNet-18 and lean on its BatchNorm to recover
    from weight surgery (transposed or re-initialised kernels); this keeps that structure at a
    size the 2-core default trains in seconds."""
    from torchvision.models.resnet import BasicBlock

    widths = tuple(int(w) for w in widths)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    inplanes = widths[0]
    for i, planes in enumerate(widths):
        stride = 1 if i == 0 else 2
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        layers.append(BasicBlock(inplanes, planes, stride, downsample))
        inplanes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
    model = nn.Sequential(*layers)
    for m in model.modules():  # torchvision's ResNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def resnet18(in_channels: int, num_classes: int, image_size: int, small_input_stem: bool = True) -> nn.Module:
    """torchvision's ResNet-18; the 32x32 stem (3x3 conv, no max-pool) suits CIFAR-sized input."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    if small_input_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


class RandomFeatures(nn.Module):
    """Random Fourier features of the flattened input and a trained linear head.

    The feature map cos(W x + b) is FIXED (buffers, never trained) and drawn from its own
    `seed`, so every model built from one spec (target, retrained, unlearned) shares it and
    only the head differs: the over-parameterised linear setting of MUSO's theorem when
    `features` exceeds the number of training samples. W ~ N(0, 1 / (lengthscale^2 * input
    dim)) approximates a Gaussian kernel whose length scale is `lengthscale` * sqrt(input dim).
    """

    def __init__(self, in_dim: int, num_classes: int, features: int, lengthscale: float, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(features, in_dim, generator=gen) / (lengthscale * math.sqrt(in_dim)))
        self.register_buffer("phase", torch.rand(features, generator=gen) * 2 * math.pi)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = math.sqrt(2.0 / self.phase.shape[0]) * torch.cos(x.flatten(1) @ self.projection.T + self.phase)
        return self.head(z)


def random_features(in_channels: int, num_classes: int, image_size: int, features: int = 512, lengthscale: float = 1.0, seed: int = 0) -> nn.Module:
    return RandomFeatures(in_channels * image_size * image_size, num_classes, features, lengthscale, seed)


ARCHITECTURES = {"small_resnet": small_resnet, "small_cnn": small_cnn, "resnet18": resnet18, "random_features": random_features}


def head_name(model: nn.Module) -> str:
    """Name of the classifier head: the model's last nn.Linear (every architecture here ends in one)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return names[-1]


def without_head(model: nn.Module) -> tuple[nn.Module, str]:
    """A copy of `model` whose head is nn.Identity, so its output is the penultimate features
    (the head's input). Returns (body, head name); the body takes the model's own weights
    minus the head's through torch.func.functional_call, hence works for stacked models too."""
    name = head_name(model)
    body = copy.deepcopy(model)
    parent_name, _, attr = name.rpartition(".")
    setattr(body.get_submodule(parent_name) if parent_name else body, attr, nn.Identity())
    return body, name


def model_spec(params: dict, num_classes: int, in_channels: int, image_size: int) -> dict:
    """The spec stored beside every checkpoint: architecture name, shapes and its options."""
    arch = choose(params["model"]["arch"], ARCHITECTURES, "architecture")
    options = dict(params["model"].get(arch) or {})
    return {"arch": arch, "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size, "options": options}


def build_model(spec: dict, seed: int | None = None) -> nn.Module:
    """A fresh model; `seed` fixes its initialisation."""
    if seed is not None:
        torch.manual_seed(seed)
    build = ARCHITECTURES[choose(spec["arch"], ARCHITECTURES, "architecture")]
    return build(spec["in_channels"], spec["num_classes"], spec["image_size"], **spec.get("options", {}))
