"""Architectures, built from a plain spec dict so a checkpoint can rebuild its model."""
from __future__ import annotations

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


ARCHITECTURES = {"small_cnn": small_cnn, "resnet18": resnet18}


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
