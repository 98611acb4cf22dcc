"""The entry point of every `stages/<name>.py` of dvc.yaml: which pipeline functions a stage runs.

Kept apart from the command line (cli.py), so that a DVC stage's code is what it runs: editing a
command of `unlearnops ...` reruns no stage (tests/test_dvc_deps.py checks dvc.yaml's deps).
"""
from __future__ import annotations

import os
import sys

from unlearnops.ops import errors
from unlearnops.params_schema import load_checked_params

# stages/<name>.py -> the pipeline functions it runs, in one process: an unlearning run is
# evaluated where it was made, saving a second process's start-up (torch, MLflow) per run.
STAGES = {
    "split": ("split",),
    "prepare": ("prepare",),
    "inputs": ("record_inputs",),
    "train_target": ("train_target",),
    "retrain": ("retrain", "evaluate_retrain"),
    "evaluate_retrain": ("evaluate_retrain",),
    "unlearn": ("unlearn", "evaluate"),
    "evaluate": ("evaluate",),
    "ulira": ("ulira",),
    "report": ("report",),
}


def run_stage(stage: str, argv: list[str]) -> None:
    """Entry point of stages/<stage>.py: any error is one line on stderr with its exit code
    (unlearnops/ops/errors.py: 2 for a bad input).

    argv: the stage's positional arguments (a data set, setting or method name), `--setting NAME`
    and `--condense NAME` for unlearn and evaluate, `--grid` for report."""
    from unlearnops import pipeline  # not on import: `unlearnops --help` stays quick

    parser = errors.OneLineParser(prog=f"stages/{stage}.py")
    parser.add_argument("names", nargs="*")
    if stage in ("unlearn", "evaluate"):
        parser.add_argument("--setting", help="the setting of params.yaml `settings` (default: the flat layout)")
        parser.add_argument("--condense", help="condense the retain set first (e.g. blend)")
    if stage == "report":
        parser.add_argument("--grid", action="store_true", help="report every setting of params.yaml")
    options = {k: v for k, v in vars(parser.parse_args(argv)).items() if v}
    names = options.pop("names", [])
    try:
        params = load_checked_params(os.environ.get("UNLEARNOPS_PARAMS", "params.yaml"))
        for function in STAGES[stage]:
            getattr(pipeline, function)(params, *names, **options)
    except Exception as err:
        sys.exit(errors.report(err, f"{stage}: "))
