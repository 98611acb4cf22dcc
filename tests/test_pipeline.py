"""The real pipeline end to end: `unlearnops repro` (dvc repro) on a tiny params file in a
temporary copy of the repository, and the stage entry points' handling of bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny

BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def pipeline_run(repo_params, tmp_path_factory):
    """One tiny `unlearnops repro` of every stage and method in params.yaml."""
    import shutil

    from conftest import REPO

    root = tmp_path_factory.mktemp("e2e")
    for name in ("dvc.yaml", "stages", "unlearnops", "data/deleted.csv"):  # the deletion list is a dependency of prepare
        src = REPO / name
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    params = tiny(repo_params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "init", "--no-scm", "-q"], root)
    run([str(BIN / "unlearnops"), "repro"], root)
    return root, params


def test_repro_produces_every_output(pipeline_run):
    root, params = pipeline_run
    n = params["n_models"]
    assert (root / "data/prepared/samples.csv").is_file()
    for folder, expected_n in [("models/target", 1), ("models/retrain", n)] + [(f"models/unlearned/{m}", n) for m in params["unlearn"]["methods"]]:
        assert (root / folder / "models.pt").is_file(), folder
        with __import__("numpy").load(root / folder / "logits.npz") as logits:
            assert logits["forget"].shape[0] == expected_n
            assert logits["test"].shape[:2] == (expected_n, len(logits["test_labels"]))
    for method in params["unlearn"]["methods"]:
        metrics = json.loads((root / "metrics/methods" / f"{method}.json").read_text())
        assert metrics["n_models"] == n and 0 <= metrics["accuracy"]["test"]["mean"] <= 1
    table = (root / "reports/table.md").read_text()
    assert all(method in table for method in params["unlearn"]["methods"]) and "retrain (half vs half)" in table
    assert (root / "reports/ranking_stability.csv").is_file()
    for plot in ("confidence_histograms", "epsilons", "final_vs_time"):
        assert (root / f"reports/plots/{plot}.png").read_bytes()[:4] == b"\x89PNG"
    html = (root / "reports/index.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "src='http" not in html


def test_dvc_metrics_show_and_nothing_reruns(pipeline_run):
    root, params = pipeline_run
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    files = next(iter(shown.values()))["data"]
    assert "metrics/retrain.json" in files and f"metrics/methods/{params['unlearn']['methods'][0]}.json" in files
    status = run(["dvc", "status"], root).stdout
    assert "changed" not in status, status


def test_changing_one_method_reruns_only_that_method(pipeline_run):
    root, params = pipeline_run
    changed = yaml.safe_load((root / "params.yaml").read_text())
    changed["methods"]["finetune"]["fit"]["lr"] = 0.01
    (root / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    try:
        dry = run(["dvc", "repro", "--dry"], root).stdout
        assert "Running stage 'unlearn@finetune'" in dry
        assert "Running stage 'retrain'" not in dry and "Running stage 'unlearn@neggrad_plus'" not in dry
    finally:
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_mlflow_has_one_parent_and_nested_stage_runs(pipeline_run):
    import mlflow

    root, params = pipeline_run
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[params["mlflow"]["experiment"]], output_format="list")
    parents = [r for r in runs if r.data.tags.get("unlearnops.stage") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    stages = {r.data.tags["unlearnops.stage"] for r in children}
    assert stages == {"prepare", "target", "retrain", "unlearn", "evaluate", "report"}
    retrain = next(r for r in children if r.data.tags["unlearnops.stage"] == "retrain")
    assert retrain.data.params["n_models"] == str(params["n_models"])
    assert "accuracy.test.mean" in retrain.data.metrics
    models = mlflow.search_logged_models(experiment_ids=[parents[0].info.experiment_id], output_format="list")
    assert len(models) >= 2 + len(params["unlearn"]["methods"])


def test_bad_inputs_fail_with_one_line_and_damage_nothing(pipeline_run):
    root, params = pipeline_run
    kept = (root / "models/unlearned/finetune/models.pt").read_bytes()

    result = run([sys.executable, "stages/unlearn.py", "magic"], root, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unlearn: unknown method 'magic'; allowed:")

    target = root / "models/target/models.pt"
    original = target.read_bytes()
    try:
        target.write_bytes(b"not a checkpoint")
        result = run([sys.executable, "stages/unlearn.py", "finetune"], root, check=False)
        assert result.returncode == 2
        assert "corrupt checkpoint" in result.stderr and "models/target/models.pt" in result.stderr
        assert (root / "models/unlearned/finetune/models.pt").read_bytes() == kept
    finally:
        target.write_bytes(original)

    bad = yaml.safe_load((root / "params.yaml").read_text())
    bad["model"]["arch"] = "vgg"
    (root / "bad.yaml").write_text(yaml.safe_dump(bad))
    env_params = {"UNLEARNOPS_PARAMS": "bad.yaml"}
    result = subprocess.run([sys.executable, "stages/train_target.py"], cwd=root, capture_output=True, text=True, env={**os.environ, **env_params, "PYTHONPATH": str(root)})
    assert result.returncode == 2
    assert "unknown architecture 'vgg'; allowed: small_cnn, resnet18" in result.stderr
    assert target.read_bytes() == original
