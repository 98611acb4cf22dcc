"""MLflow helpers: one run per stage execution, nested under one parent run per pipeline run.

The tracking store defaults to a SQLite file in the repo (params.yaml `mlflow`);
`MLFLOW_TRACKING_URI` selects a server instead. The experiment is a classic ML experiment
(tag mlflow.experimentKind = custom_model_development: the UI opens on runs, not the GenAI
overview), and its artifact location follows the checkout: with the SQLite store inside the
checkout, a copied or moved checkout has its locations rewritten to its own mlartifacts/.

Parents: `unlearnops repro` opens the parent run and passes its id to the stages through
`UNLEARNOPS_PARENT_RUN_ID`. Under a plain `dvc repro` each stage finds its parent through a
marker file (.dvc/tmp/unlearnops-mlflow-parent.json) keyed by the `dvc` process it runs under:
the first stage of a repro creates the parent ("dvc repro"), the others reuse it. A stage that
fails marks its parent FAILED; the parent of a plain `dvc repro` ends FINISHED with its last stage
unless one failed.

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
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # a classic ML experiment in the MLflow UI
SESSION_MARKER = Path(".dvc") / "tmp" / "unlearnops-mlflow-parent.json"
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
    uri, from_env = _tracking_uri(params)
    database = None if from_env else _local_sqlite(uri)
    if database is not None:  # absolute, resolved in THIS checkout (MLflow caches engines by URI, per process)
        uri = f"sqlite:///{database.resolve()}"
    _last_uri, _last_uri_from_env = uri, from_env
    mlflow.set_tracking_uri(_last_uri)
    artifacts = Path(cfg["artifact_root"]).resolve().as_uri()
    experiment = mlflow.get_experiment_by_name(cfg["experiment"])
    if experiment is None:
        mlflow.create_experiment(cfg["experiment"], artifact_location=artifacts, tags=EXPERIMENT_KIND)
    else:
        if any(experiment.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):  # made before the tag existed
            for key, value in EXPERIMENT_KIND.items():
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        follow_checkout(database, experiment.experiment_id, experiment.artifact_location, artifacts, cfg["artifact_root"])
    mlflow.set_experiment(cfg["experiment"])
    return mlflow


def _local_sqlite(uri: str) -> Path | None:
    """The file of a sqlite:/// URI with a RELATIVE path (a store inside the checkout), else None."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):].startswith("/"):
        return None
    return Path(uri[len(prefix):])


def follow_checkout(database: Path | None, experiment_id: str, current: str, wanted: str, root: str) -> bool:
    """With a SQLite store inside the checkout, point the experiment's artifact location (and its
    runs', logged models' and model versions' locations under it) at THIS checkout's artifact root
    when the checkout was copied or moved: MLflow stores absolute paths, so a copy would otherwise
    write into the original's folder. Only the same relative artifact root (params mlflow.artifact_root)
    in another folder counts as a move. `database`: the store's file if it lives in the checkout (a
    relative sqlite:/// path in params), else None (nothing to do). Returns whether anything was rewritten."""
    if database is None or current == wanted or not current.startswith("file://") or not database.is_file():
        return False
    if Path(root).is_absolute() or not current.rstrip("/").endswith("/" + Path(root).as_posix().strip("/")):
        return False
    import sqlite3

    with sqlite3.connect(database) as db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (wanted, experiment_id))
        for table, column in (("runs", "artifact_uri"), ("logged_models", "artifact_location"),
                              ("model_versions", "storage_location"), ("model_versions", "source")):
            try:
                db.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                           (wanted, len(current) + 1, len(current), current))
            except sqlite3.OperationalError:  # a table this MLflow version does not have
                pass
    logging.getLogger(__name__).warning("mlflow: this checkout was moved or copied: artifact locations now under %s (were %s)", wanted, current)
    return True


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
    parent = os.environ.get(PARENT_ENV) or session_parent(mlflow, params["mlflow"]["experiment"])
    failed = True
    try:
        with mlflow.start_run(run_name=run_name or stage, parent_run_id=parent, tags={"unlearnops.stage": stage}) as run:
            mlflow.log_params(logged)
            yield mlflow, run
        failed = False
    finally:
        if parent:
            _after_child(mlflow, parent, failed, own=not os.environ.get(PARENT_ENV))


def _dvc_session() -> str | None:
    """Under `dvc repro` (DVC_STAGE set): '<pid>-<start time>' of the dvc process this stage runs
    under (found through /proc), so the stages of one repro share a key and the next repro does not."""
    if not os.environ.get("DVC_STAGE"):
        return None
    pid = os.getppid()
    for _ in range(8):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            argv = [Path(a).name for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:3]]
        except (OSError, IndexError):
            break
        if "dvc" in argv[:2]:  # `dvc ...` or `python .../bin/dvc ...`
            return f"{pid}-{fields[19]}"
        pid = int(fields[1])
        if pid <= 1:
            break
    return f"ppid-{os.getppid()}"


def session_parent(mlflow, experiment: str) -> str | None:
    """The parent run of this `dvc repro` (see the module docstring): reused from the marker file
    when it names this repro and store, else created ("dvc repro", tagged unlearnops.stage=pipeline)."""
    session = _dvc_session()
    if session is None:
        return None
    marker = Path(os.environ.get("DVC_ROOT", ".")) / SESSION_MARKER
    uri = mlflow.get_tracking_uri()
    try:
        known = json.loads(marker.read_text())
        if known.get("session") == session and known.get("tracking_uri") == uri:
            return known["run_id"]
    except (OSError, ValueError, KeyError):
        pass
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    run = mlflow.MlflowClient().create_run(experiment_id, run_name="dvc repro",
                                           tags={"unlearnops.stage": "pipeline", "unlearnops.session": session})
    write_json(marker, {"session": session, "tracking_uri": uri, "run_id": run.info.run_id})
    return run.info.run_id


def _after_child(mlflow, parent: str, failed: bool, own: bool) -> None:
    """A stage run ended: a failure marks the parent FAILED; the parent of a plain dvc repro (`own`)
    otherwise ends FINISHED with this stage (the next stage of the repro moves its end on)."""
    client = mlflow.MlflowClient()
    try:
        if failed:
            client.set_terminated(parent, status="FAILED")
        elif own and client.get_run(parent).info.status != "FAILED":
            client.set_terminated(parent, status="FINISHED")
    except Exception as err:  # noqa: BLE001 (tracking must not hide the stage's own outcome)
        logging.getLogger(__name__).warning("mlflow: could not update parent run %s: %s", parent, err)


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
        if record["status"] == "FAILED" and parent_run_id:
            client.set_terminated(parent_run_id, status="FAILED")  # a failed stage fails its pipeline
        path.unlink()
    return len(files)


def log_model(mlflow, module, example: np.ndarray, name: str = "model"):
    """Log one torch model with an input example (so MLflow records its signature)."""
    return mlflow.pytorch.log_model(module, name=name, input_example=example, pip_requirements=MODEL_REQUIREMENTS)
