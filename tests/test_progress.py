"""Progress bars under `dvc repro` (fast): in a terminal a live bar; under DVC without one, plain lines; else off."""
from __future__ import annotations

import io
import sys

import pytest

from unlearnops import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty, env, expected", [
    (True, {}, "tty"),
    (False, {"DVC_STAGE": "unlearn@digits-random-2-finetune"}, "lines"),  # dvc repro 2>&1 | tee log
    (False, {"UNLEARNOPS_PROGRESS": "1"}, "lines"),
    (False, {}, "off"),                                                   # library calls, tests
    (True, {"UNLEARNOPS_PROGRESS": "0"}, "off"),
])
def test_mode_follows_the_terminal_and_dvc(monkeypatch, tty, env, expected):
    for name in ("DVC_STAGE", "UNLEARNOPS_PROGRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert progress.mode(_Tty() if tty else io.StringIO()) == expected


def test_under_dvc_without_a_terminal_each_update_is_one_line(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setenv("DVC_STAGE", "unlearn@s-finetune")
    monkeypatch.setenv("UNLEARNOPS_PROGRESS_INTERVAL", "0")
    bar = progress.bar(range(3), desc="finetune x32")
    for _ in bar:
        bar.set_postfix(loss="0.1000")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and lines and all(line.startswith("finetune x32:") for line in lines)
    assert "3/3" in lines[-1] and "loss=0.1000" in lines[-1]  # the final state stays


def test_a_log_gets_the_first_line_then_few_then_the_last(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setenv("DVC_STAGE", "unlearn@s-finetune")
    monkeypatch.delenv("UNLEARNOPS_PROGRESS_INTERVAL", raising=False)  # 30 s: a fast bar prints its start and its end
    bar = progress.bar(range(50), desc="relearn F1 x8")
    for _ in bar:
        bar.set_postfix(loss="0.5")  # a redraw per epoch, which a log must not get
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "0/50" in lines[0] and "50/50" in lines[1]


def test_off_prints_nothing(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("UNLEARNOPS_PROGRESS", raising=False)
    assert list(progress.bar(range(3), desc="x")) == [0, 1, 2] and log.getvalue() == ""
