"""params.yaml: loading and the small validation helpers every module uses.

Every knob lives in params.yaml; code reads it through `load_params` and fails with a
`ConfigError` that names the offending key, value and the allowed values.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import yaml


class ConfigError(ValueError):
    """A bad value in params.yaml or on the command line."""


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    params = yaml.safe_load(path.read_text())
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(params).__name__}")
    return params


def section(params: dict, dotted: str) -> Any:
    """params['a']['b'] for 'a.b', with an error naming the missing key."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"params.yaml has no key '{dotted}'")
        node = node[part]
    return node


def choose(value: Any, allowed: Iterable[Any], what: str) -> Any:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"unknown {what} '{value}'; allowed: {', '.join(map(str, allowed))}")
    return value


def build_dataclass(cls: type, values: dict | None, where: str):
    """Instantiate a hyperparameter dataclass from a params.yaml mapping.

    Unknown keys and missing keys are errors, so a typo in params.yaml never silently
    falls back to a default hidden in code.
    """
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    return cls(**values)
