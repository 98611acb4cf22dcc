"""params.yaml: loading and the small validation helpers every module uses.

Every knob lives in params.yaml; code reads it through `load_params` and fails with a
`ConfigError` that names the offending key, value and the allowed values.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml


class ConfigError(ValueError):
    """A bad value in params.yaml or on the command line."""


class FieldError(ConfigError):
    """A bad value of one field, raised by a config dataclass's checks (`__post_init__`);
    `build_dataclass` names it with its full key path (`methods.scrub.fit.lr: ...`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


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
    """Instantiate a config dataclass from a params.yaml mapping, validated once, here.

    Unknown keys and missing keys are errors, so a typo in params.yaml never silently falls back
    to a default hidden in code. Fields annotated int, float, str or bool must hold a value of
    that type (an int is a float); a field whose annotation is itself a config dataclass
    (`fit: FitConfig`) is built from its nested mapping the same way. Every error names the key
    path (`methods.scrub.fit.lr: ...`); the dataclass's own checks raise `FieldError` for that.
    An instance of `cls` passes through unchanged.
    """
    if isinstance(values, cls):
        return values
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {values!r}")
    values = dict(values or {})
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    missing = [f.name for f in fields if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    hints = _type_hints(cls)
    for name, value in values.items():
        values[name] = _typed(value, hints.get(name), f"{where}.{name}")
    try:
        return cls(**values)
    except FieldError as error:
        raise ConfigError(f"{where}.{error.field}: {error.message}") from None
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


@functools.cache
def _type_hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _typed(value: Any, hint: Any, where: str) -> Any:
    """value checked against a field's annotation (plain scalars and nested config dataclasses;
    other annotations are the dataclass's own business)."""
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if hint not in _SCALARS:
        return value
    ok = isinstance(value, hint) and not (hint is not bool and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"{where}: expected {_SCALARS[hint]}, got {value!r}")
    return value
