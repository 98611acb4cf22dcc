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

import sys

OK, NEGATIVE, USAGE, REFUSED, INTERNAL = 0, 1, 2, 3, 4


def classify(err: BaseException) -> tuple[int, str]:
    """(exit code, prefix) for an exception."""
    from unlearnops.config import ConfigError
    from unlearnops.ops.ledger import LedgerError, Refused
    from unlearnops.ops.model_registry import RegistryError, UnknownVersion
    from unlearnops.stack import CheckpointError

    if isinstance(err, UnknownVersion):
        return USAGE, "error"
    if isinstance(err, (Refused, RegistryError)):
        return REFUSED, "refused"
    if isinstance(err, (ConfigError, LedgerError, CheckpointError, FileNotFoundError, IsADirectoryError,
                        NotADirectoryError, PermissionError, ValueError)):
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
