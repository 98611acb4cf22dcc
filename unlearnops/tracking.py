"""MLflow helpers: one run per stage execution, nested under one parent run per pipeline run.

The tracking store defaults to a SQLite file in the repo (params.yaml `mlflow`);
`MLFLOW_TRACKING_URI` selects a server instead. `unlearnops repro` opens the parent run and
passes its id to the stages through `UNLEARNOPS_PARENT_RUN_ID`.

Importing MLflow and opening its store costs a stage process about 2 s of CPU, more than many
stages' work. So under `unlearnops repro` (and the benchmark flow) a stage writes its run to a
spool folder (`UNLEARNOPS_MLFLOW_SPOOL`) as JSON, and `replay` logs every spooled run to MLflow
once the pipeline is done, with its own start and end times. Called directly, stages log at once.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from unlearnops.files import write_json

PARENT_ENV = "UNLEARNOPS_PARENT_RUN_ID"
SPOOL_ENV = "UNLEARNOPS_MLFLOW_SPOOL"
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


def _now_ms() -> int:
    return int(time.time() * 1000)


class SpooledRun:
    """The part of the mlflow module a stage uses (log_params, log_metrics, log_metric, set_tag,
    log_artifact), recorded for `replay` instead of sent."""

    def __init__(self, run_name: str, stage: str):
        self.record = {"run_name": run_name, "tags": {"unlearnops.stage": stage}, "params": {}, "metrics": [],
                       "artifacts": [], "start_ms": _now_ms()}

    def log_params(self, params: dict) -> None:
        self.record["params"].update({k: str(v) for k, v in params.items()})

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.record["metrics"].append([key, float(value), _now_ms(), step or 0])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def set_tag(self, key: str, value) -> None:
        self.record["tags"][key] = str(value)

    def log_artifact(self, path: str) -> None:
        self.record["artifacts"].append(str(Path(path).resolve()))


@contextmanager
def stage_run(params: dict, stage: str, logged_params: dict, run_name: str | None = None, spool: bool = True):
    """An MLflow run for one stage execution, under the pipeline's parent run if there is one;
    spooled for `replay` when UNLEARNOPS_MLFLOW_SPOOL names a folder (and `spool`: a stage that
    registers a model needs the real run). Yields (mlflow or a SpooledRun, the run or None)."""
    logged = {k: str(v)[:500] for k, v in flatten(logged_params).items()}
    spool_dir = os.environ.get(SPOOL_ENV)
    if spool and spool_dir:
        spooled = SpooledRun(run_name or stage, stage)
        spooled.log_params(logged)
        status = "FAILED"
        try:
            yield spooled, None
            status = "FINISHED"
        finally:
            spooled.record.update(status=status, end_ms=_now_ms())
            write_json(Path(spool_dir) / f"{spooled.record['start_ms']}-{uuid.uuid4().hex[:8]}.json", spooled.record)
        return
    mlflow = configure(params)
    parent = os.environ.get(PARENT_ENV) or None
    with mlflow.start_run(run_name=run_name or stage, parent_run_id=parent, tags={"unlearnops.stage": stage}) as run:
        mlflow.log_params(logged)
        yield mlflow, run


def replay(params: dict, spool_dir: str | Path, parent_run_id: str | None) -> int:
    """Log every spooled run in `spool_dir` to MLflow (nested under `parent_run_id`), oldest first,
    with its recorded times; each file is deleted once logged. Returns how many were logged."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    files = sorted(Path(spool_dir).glob("*.json"))
    if not files:
        return 0
    mlflow = configure(params)
    client = MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(params["mlflow"]["experiment"]).experiment_id
    for path in files:
        record = json.loads(path.read_text())
        tags = dict(record["tags"]) | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
        run = client.create_run(experiment_id, start_time=record["start_ms"], tags=tags, run_name=record["run_name"])
        run_id = run.info.run_id
        params_list = [Param(k, v) for k, v in record["params"].items()]
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
        for i in range(0, max(len(params_list), len(metrics)), 100):  # MLflow's batch limits
            client.log_batch(run_id, metrics=metrics[i:i + 100], params=params_list[i:i + 100])
        for artifact in record["artifacts"]:
            if Path(artifact).is_file():
                client.log_artifact(run_id, artifact)
        client.set_terminated(run_id, status=record["status"], end_time=record["end_ms"])
        path.unlink()
    return len(files)


def log_model(mlflow, module, example: np.ndarray, name: str = "model"):
    """Log one torch model with an input example (so MLflow records its signature)."""
    return mlflow.pytorch.log_model(module, name=name, input_example=example, pip_requirements=MODEL_REQUIREMENTS)
