"""MLflow for a newcomer (fast, in-process, on a SQLite store in tmp_path): a classic ML experiment,
every stage run under a parent also under a plain `dvc repro`, a failed stage fails its parent,
artifact locations that follow a copied checkout, and a registered model with a signature."""
from __future__ import annotations

import copy
import shutil
import subprocess

import pytest
import torch

from unlearnops import tracking


@pytest.fixture
def local_params(repo_params, tmp_path, monkeypatch):
    """The default params with the store and artifacts RELATIVE to the checkout (as params.yaml has them), in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in (tracking.PARENT_ENV, tracking.SPOOL_ENV, "DVC_STAGE", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    params = copy.deepcopy(repo_params)
    assert params["mlflow"]["tracking_uri"] == "sqlite:///mlflow.db" and params["mlflow"]["artifact_root"] == "mlartifacts"
    return params


def _runs(mlflow, params):
    return {r.info.run_name: r for r in mlflow.search_runs(experiment_names=[params["mlflow"]["experiment"]], output_format="list")}


def test_the_experiment_is_a_classic_ml_experiment(local_params):
    mlflow = tracking.configure(local_params)
    experiment = mlflow.get_experiment_by_name(local_params["mlflow"]["experiment"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    client = mlflow.MlflowClient()
    client.delete_experiment_tag(experiment.experiment_id, "mlflow.experimentKind")  # an experiment made before the tag
    tracking.configure(local_params)
    assert mlflow.get_experiment(experiment.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_stages_of_one_dvc_repro_share_a_parent_and_a_failure_fails_it(local_params, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "unlearn@s-finetune")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setattr(tracking, "_dvc_session", lambda: "dvc-111")
    with tracking.stage_run(local_params, "prepare", {}, run_name="prepare-s", spool=False):
        pass
    with tracking.stage_run(local_params, "unlearn", {}, run_name="unlearn-s", spool=False):
        pass
    mlflow = tracking.configure(local_params)
    runs = _runs(mlflow, local_params)
    parent = runs["dvc repro"]
    assert parent.data.tags["unlearnops.stage"] == "pipeline" and parent.info.status == "FINISHED"
    assert {runs[n].data.tags["mlflow.parentRunId"] for n in ("prepare-s", "unlearn-s")} == {parent.info.run_id}
    with pytest.raises(RuntimeError), tracking.stage_run(local_params, "evaluate", {}, run_name="evaluate-s", spool=False):
        raise RuntimeError("a failing stage")
    with tracking.stage_run(local_params, "report", {}, run_name="report", spool=False):
        pass  # a later stage does not turn the failed pipeline green
    runs = _runs(mlflow, local_params)
    assert runs["evaluate-s"].info.status == "FAILED" and runs["dvc repro"].info.status == "FAILED"

    monkeypatch.setattr(tracking, "_dvc_session", lambda: "dvc-222")  # the next dvc repro: a new parent
    with tracking.stage_run(local_params, "prepare", {}, run_name="prepare-again", spool=False):
        pass
    runs = mlflow.search_runs(experiment_names=[local_params["mlflow"]["experiment"]], output_format="list")
    parents = [r for r in runs if r.info.run_name == "dvc repro"]
    assert len(parents) == 2
    again = next(r for r in runs if r.info.run_name == "prepare-again")
    assert again.data.tags["mlflow.parentRunId"] != parent.info.run_id


def test_without_dvc_a_stage_has_no_made_up_parent(local_params):
    with tracking.stage_run(local_params, "prepare", {}, run_name="alone", spool=False):
        pass
    mlflow = tracking.configure(local_params)
    assert "mlflow.parentRunId" not in _runs(mlflow, local_params)["alone"].data.tags


def test_the_dvc_session_is_the_dvc_process(monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "x")
    code = "from unlearnops import tracking; print(tracking._dvc_session())"
    import os
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "DVC_STAGE": "x"}
    # a fake `dvc` (a script named dvc) running the stage through a shell, as DVC does
    fake = Path(os.environ.get("TMPDIR", "/tmp")) / f"ux-fake-{os.getpid()}" / "dvc"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text(f"#!{sys.executable}\nimport subprocess, sys\nsubprocess.run(['/bin/sh', '-c', sys.argv[1]])\n")
    fake.chmod(0o755)
    try:
        first = subprocess.run([str(fake), f"{sys.executable} -c '{code}'"], env=env, capture_output=True, text=True, check=True).stdout.strip()
        second = subprocess.run([str(fake), f"{sys.executable} -c '{code}'"], env=env, capture_output=True, text=True, check=True).stdout.strip()
    finally:
        shutil.rmtree(fake.parent)
    assert first and not first.startswith("ppid-") and first != second  # found the dvc process; each repro its own


def test_unlearnops_repro_fails_its_parent_when_dvc_fails(local_params, tmp_path, monkeypatch):
    import yaml

    from unlearnops import cli

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(local_params))
    monkeypatch.setattr(cli.subprocess, "call", lambda *a, **k: 1)
    assert cli.main(["repro"]) == 1
    mlflow = tracking.configure(local_params)
    assert _runs(mlflow, local_params)["pipeline"].info.status == "FAILED"


def test_a_copied_checkout_writes_its_artifacts_into_its_own_folder(local_params, tmp_path, monkeypatch):
    original, copy_ = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    monkeypatch.chdir(original)
    mlflow = tracking.configure(local_params)
    with mlflow.start_run(run_name="first") as run:
        (original / "note.txt").write_text("x")
        mlflow.log_artifact(str(original / "note.txt"))
    mlflow.end_run()
    shutil.copytree(original, copy_)
    monkeypatch.chdir(copy_)
    mlflow = tracking.configure(local_params)
    experiment = mlflow.get_experiment_by_name(local_params["mlflow"]["experiment"])
    assert experiment.artifact_location == (copy_ / "mlartifacts").as_uri()
    first = mlflow.get_run(run.info.run_id)
    assert first.info.artifact_uri.startswith((copy_ / "mlartifacts").as_uri())
    with mlflow.start_run(run_name="second") as second:
        mlflow.log_artifact(str(copy_ / "note.txt"))
    assert second.info.artifact_uri.startswith((copy_ / "mlartifacts").as_uri())
    assert not list((original / "mlartifacts").glob(f"*/{second.info.run_id}"))  # nothing written into the original
    monkeypatch.chdir(original)  # the original keeps its own
    assert tracking.configure(local_params).get_experiment(experiment.experiment_id).artifact_location == (original / "mlartifacts").as_uri()


def test_the_registered_onnx_model_has_a_signature(local_params, repo_params):
    from conftest import tiny

    from unlearnops.nets import model_spec
    from unlearnops.ops import model_registry
    from unlearnops.stack import ModelStack

    params = tiny(repo_params)
    params["mlflow"] = local_params["mlflow"]
    spec = model_spec(params, num_classes=4, in_channels=1, image_size=8)
    stack = ModelStack.fresh(spec, [0])
    mlflow = tracking.configure(params)
    with mlflow.start_run():
        info, _ = model_registry.log_model_files(mlflow, stack, torch.randn(16, 1, 8, 8), params)
    signature = mlflow.models.get_model_info(info.model_uri).signature
    assert signature is not None
    assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"] in ([-1, 1, 8, 8], (-1, 1, 8, 8))
    assert signature.outputs.to_dict()[0]["tensor-spec"]["shape"] in ([-1, 4], (-1, 4))
