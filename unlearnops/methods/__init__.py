"""Unlearning methods: one module each, registered by name.

Adding a method is one file in this folder (a subclass of `Unlearner` decorated with
`@register("name")`) plus its hyperparameters under `methods.<name>` in params.yaml.
Every module here is imported on first use, so registration needs no list to edit.
"""
from __future__ import annotations

import importlib
import pkgutil

from unlearnops.config import ConfigError, choose
from unlearnops.methods.base import Unlearner, UnlearnData

_REGISTRY: dict[str, type[Unlearner]] = {}


def register(name: str):
    def add(cls: type[Unlearner]) -> type[Unlearner]:
        if name in _REGISTRY:
            raise ValueError(f"method '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_method(name: str, params: dict) -> Unlearner:
    """The method `name`, configured from params.yaml (`methods.<name>` and shared sections)."""
    choose(name, available(), "method")
    hparams = params.get("methods", {}).get(name)
    if hparams is None:
        raise ConfigError(f"params.yaml has no hyperparameters for method '{name}' (expected methods.{name})")
    return _REGISTRY[name](hparams, params)


__all__ = ["Unlearner", "UnlearnData", "register", "available", "get_method"]
