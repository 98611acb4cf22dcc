"""Progress bars that show under `dvc repro` (imports only tqdm).

DVC runs a stage with the terminal's stdout and stderr, so in a terminal a plain tqdm bar shows.
When the output goes to a log (`dvc repro 2>&1 | tee log`, CI, a Prefect worker), tqdm's default
(`disable=None`) turns every bar off and a stage is silent for minutes. Here a bar is:

- in a terminal: tqdm's live bar on stderr, redrawn at most every `TTY_INTERVAL` seconds;
- under DVC (`DVC_STAGE` set) or with UNLEARNOPS_PROGRESS=1, without a terminal: one plain line per
  update, at most every UNLEARNOPS_PROGRESS_INTERVAL seconds (default 30), and the final state;
- otherwise (library calls, tests), or with UNLEARNOPS_PROGRESS=0: off.
"""
from __future__ import annotations

import os
import sys
import time

TTY_INTERVAL = 1.0
LOG_INTERVAL = 30.0


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into plain lines for a log: the first,
    then at most one per `interval` seconds (set_postfix redraws at every call), and the last when the
    bar closes (tqdm's closing newline)."""

    def __init__(self, stream, interval: float):
        self.stream, self.interval = stream, interval
        self.last, self.pending = -float("inf"), None

    def write(self, text: str) -> None:
        status = text.replace("\r", "").strip()
        if status:
            now = time.monotonic()
            if now - self.last >= self.interval:
                self._emit(status)
                self.last = now
            else:
                self.pending = status
        elif "\n" in text and self.pending:
            self._emit(self.pending)

    def _emit(self, status: str) -> None:
        self.stream.write(status + "\n")
        self.stream.flush()
        self.pending = None

    def flush(self) -> None:
        self.stream.flush()


def mode(stream=None) -> str:
    """'tty', 'lines' or 'off' for `stream` (default sys.stderr) and the environment."""
    stream = sys.stderr if stream is None else stream
    wanted = os.environ.get("UNLEARNOPS_PROGRESS", "").strip().lower()
    if wanted in ("0", "false", "off", "no"):
        return "off"
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return "tty"
    if wanted in ("1", "true", "on", "yes") or os.environ.get("DVC_STAGE"):
        return "lines"
    return "off"


def bar(iterable=None, desc: str = "", total: int | None = None, leave: bool = False, **kwargs):
    """A tqdm bar over `iterable` on stderr, shown as the module docstring says."""
    from tqdm import tqdm

    how = mode()
    if how == "tty":
        return tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr, mininterval=TTY_INTERVAL, **kwargs)
    if how == "lines":
        interval = float(os.environ.get("UNLEARNOPS_PROGRESS_INTERVAL", LOG_INTERVAL))
        # leave=True: the final state (epochs done, last loss) stays as the last line
        return tqdm(iterable, desc=desc, total=total, leave=True, file=_Lines(sys.stderr, interval), mininterval=interval,
                    maxinterval=max(interval, 10.0), ncols=100, ascii=True, **kwargs)
    return tqdm(iterable, desc=desc, total=total, disable=True, **kwargs)
