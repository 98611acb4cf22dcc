"""Exit codes and one-line error messages shared by the CLI and the flows.

    0  success
    1  done, but the outcome is negative: a submitted request was rejected, or a deletion
       run's requests failed (gates failed, or the run could not unlearn them)
    2  usage: bad arguments, params.yaml, request or data files (nothing was changed)
    3  refused: the ledger or registry state does not allow it (illegal transition, already
       decided, not the pending candidate, another deletion run holds the lease)
    4  internal: anything unexpected (a bug, an unreachable store); the message names its class

Every error is ONE line on stderr: `error: ...`, `refused: ...` or `internal error: ...`.
"""
from __future__ import annotations

import argparse
import sys

from unlearnops.config import ConfigError

OK, NEGATIVE, USAGE, REFUSED, INTERNAL = 0, 1, 2, 3, 4


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit code 2)."""

    def error(self, message: str):
        print(f"error: {self.prog}: {' '.join(message.split())} (see --help)", file=sys.stderr)
        sys.exit(USAGE)


def _classes(module: str, *names: str) -> tuple[type, ...]:
    """Exception classes of `module` if it is loaded: an error of a module never imported cannot
    have been raised, and importing it here would load torch or MLflow just to print one line."""
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, name) for name in names) if loaded is not None else ()


def classify(err: BaseException) -> tuple[int, str]:
    """(exit code, prefix) for an exception."""
    if isinstance(err, _classes("unlearnops.ops.model_registry", "UnknownVersion")):
        return USAGE, "error"
    if isinstance(err, _classes("unlearnops.ops.ledger", "Refused") + _classes("unlearnops.ops.model_registry", "RegistryError")):
        return REFUSED, "refused"
    if isinstance(err, (ConfigError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError,
                        *_classes("unlearnops.ops.ledger", "LedgerError"), *_classes("unlearnops.stack", "CheckpointError"))):
        return USAGE, "error"
    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted"
    return INTERNAL, "internal error"


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def report(err: BaseException, prefix_extra: str = "") -> int:
    """Print `err` as one line on stderr; return its exit code."""
    code, prefix = classify(err)
    message = one_line(err)
    if code == INTERNAL:
        message = f"{type(err).__name__}: {message}"
    print(f"{prefix}: {prefix_extra}{message}", file=sys.stderr)
    return code
