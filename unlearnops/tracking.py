"""MLflow helpers: one run per stage execution, nested under one parent run per pipeline run.

The tracking store defaults to a SQLite file in the repo (params.yaml `mlflow`);
`MLFLOW_TRACKING_URI` selects a server instead. `unlearnops repro` opens the parent run and
passes its id to the stages through `UNLEARNOPS_PARENT_RUN_ID`.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

PARENT_ENV = "UNLEARNOPS_PARENT_RUN_ID"
# Logging a model needs no environment inference: we know what it runs on.
MODEL_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1"]


# mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI (for subprocesses), so the variable
# only means "the user chose a store" if this process did not put it there itself.
_last_uri: str | None = None
_last_uri_from_env = False


def _tracking_uri(params: dict) -> tuple[str, bool]:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and (env != _last_uri or _last_uri_from_env):
        return env, True
    return params["mlflow"]["tracking_uri"], False


def configure(params: dict):
    """Point MLflow at the store and experiment from params (MLFLOW_TRACKING_URI, if the user set
    it, wins); returns mlflow."""
    global _last_uri, _last_uri_from_env
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    cfg = params["mlflow"]
    _last_uri, _last_uri_from_env = _tracking_uri(params)
    mlflow.set_tracking_uri(_last_uri)
    if mlflow.get_experiment_by_name(cfg["experiment"]) is None:
        artifacts = Path(cfg["artifact_root"]).resolve().as_uri()
        mlflow.create_experiment(cfg["experiment"], artifact_location=artifacts)
    mlflow.set_experiment(cfg["experiment"])
    return mlflow


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@contextmanager
def stage_run(params: dict, stage: str, logged_params: dict, run_name: str | None = None):
    """An MLflow run for one stage execution, under the pipeline's parent run if there is one."""
    mlflow = configure(params)
    parent = os.environ.get(PARENT_ENV) or None
    with mlflow.start_run(run_name=run_name or stage, parent_run_id=parent, tags={"unlearnops.stage": stage}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(logged_params).items()})
        yield mlflow, run


def log_model(mlflow, module, example: np.ndarray, name: str = "model"):
    """Log one torch model with an input example (so MLflow records its signature)."""
    return mlflow.pytorch.log_model(module, name=name, input_example=example, pip_requirements=MODEL_REQUIREMENTS)
