"""`unlearnops tune`: a tiny study end to end (best params written and applied to params.yaml in
exactly those keys, MLflow runs, a rerun adds nothing), the test split never read, a trial left
RUNNING by a crash retried on resume (simulated here; the slow tier kills a real `unlearnops tune`
with SIGKILL), the `tune` schema's one-line errors, and the report's sensitivity section."""
from __future__ import annotations

import copy
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, tiny
from unlearnops import pipeline, tracking, tune
from unlearnops.config import ConfigError

SETTING = "synthetic-random-5"


@pytest.fixture(scope="module")
def workdir(repo_params, tmp_path_factory):
    """A tiny setting's DVC outputs (split, target, forget set, 4 retrained models) in a temporary folder,
    and params whose `tune` section searches it with 4 models in 2 chunks."""
    root = tmp_path_factory.mktemp("tune")
    params = tiny(repo_params)
    params["data"]["deleted"] = str(root / "deleted.csv")
    params["mlflow"].update(tracking_uri=f"sqlite:///{root}/mlflow.db", artifact_root=str(root / "mlartifacts"))
    params["datasets"]["production"] = {}  # ops.dataset elsewhere: the tiny target is not registered as a champion
    params["ops"]["dataset"] = "production"
    params["tune"].update(setting=SETTING, n_models=4, chunks=2, n_trials=3, pruner_startup_trials=2,
                          heartbeat_seconds=1, grace_seconds=2)
    params["evaluate"]["time_budget"] = 1.0  # tiny() trains the target 6 epochs, not 15: the methods' 2 epochs are a third of it
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv(tracking.SPOOL_ENV, str(root / "spool"))  # the stages' MLflow runs spooled, never sent: seconds saved
        pipeline.split(params, "synthetic")
        pipeline.train_target(params, "synthetic")
        pipeline.prepare(params, SETTING)
        pipeline.retrain(params, SETTING)
    return root, params


def _nested(values: dict) -> dict:
    """{"fit.lr": 0.1} -> {"fit": {"lr": 0.1}}"""
    tree: dict = {}
    for key, value in values.items():
        *head, last = key.split(".")
        node = tree
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def test_a_tiny_study_writes_the_best_params_and_applies_exactly_them(workdir, monkeypatch):
    root, params = workdir
    monkeypatch.chdir(root)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")  # the real file, comments and all
    before_text = (root / "params.yaml").read_text()
    summary = tune.tune(params, "finetune", params_path=root / "params.yaml", apply=True)

    numbers = [t["number"] for t in summary["trials"]]
    assert summary["n_finished"] == 3 and len(numbers) == len(set(numbers)) == 3
    first = summary["trials"][0]
    assert first["defaults"] and first["params"] == {k: tune.get_dotted(params["methods"]["finetune"], k) for k in params["tune"]["spaces"]["finetune"]}
    assert summary["defaults"]["value"] == first["value"]
    best = summary["best"]
    feasible = [t["value"] for t in summary["trials"] if t["state"] == "COMPLETE" and t["feasible"]]
    assert best["value"] == max(feasible) and 0 <= best["value"] <= 1

    written = yaml.safe_load((root / "tune" / SETTING / "finetune.yaml").read_text())
    assert written == {"methods": {"finetune": _nested(best["params"])}}
    after_text = (root / "params.yaml").read_text()
    expected = yaml.safe_load(before_text)
    for key, value in best["params"].items():
        tune.set_dotted(expected["methods"]["finetune"], key, value)
    assert yaml.safe_load(after_text) == expected  # exactly those values changed ...
    changed = [(a, b) for a, b in zip(before_text.splitlines(), after_text.splitlines()) if a != b]
    leaves = {key.rsplit(".", 1)[-1] for key in best["params"]}
    assert len(before_text.splitlines()) == len(after_text.splitlines())  # ... and nothing else moved: comments kept
    for old, new in changed:  # each a line of a tuned key, its comment kept
        assert new.strip().split(":")[0] in leaves and old.partition("#")[2] == new.partition("#")[2]

    mlflow = tracking.configure(params)
    runs = mlflow.search_runs(experiment_names=[params["mlflow"]["experiment"]], output_format="list")
    parents = [r for r in runs if r.data.tags.get("unlearnops.stage") == "tune"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == numbers

    again = tune.tune(params, "finetune")  # the study is done: a rerun resumes it and adds no trial
    assert [t["number"] for t in again["trials"]] == numbers and again["best"] == best


def test_trials_never_read_the_test_split(workdir, tmp_path, monkeypatch):
    """The same trial scores the same after every trace of the test split is corrupted: its logits NaN,
    its labels out of range (either would make any score that read them fail or change)."""
    root, params = workdir
    for folder in ("data", "models"):
        shutil.copytree(root / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    side = tune.load_validation_side(params, SETTING)
    assert set(side.parts) == set(side.retrained) == {"retain", "forget", "val"}
    hparams = params["methods"]["finetune"]
    before = tune.run_trial(side, "finetune", hparams, 2, 1)

    logits = Path("models") / SETTING / "retrain" / "logits.npz"
    with np.load(logits) as blob:
        arrays = dict(blob)
    arrays["test"] = np.full_like(arrays["test"], np.nan)
    arrays["test_labels"] = np.full_like(arrays["test_labels"], -1)
    np.savez(logits, **arrays)
    images = Path("data/split/synthetic/images.pt")
    blob = torch.load(images, weights_only=True)
    import pandas as pd

    test_rows = torch.from_numpy((pd.read_csv(Path("data/prepared") / SETTING / "samples.csv")["split"] == "test").to_numpy())
    blob["labels"][test_rows] = 10_000
    torch.save(blob, images)

    after = tune.run_trial(tune.load_validation_side(params, SETTING), "finetune", hparams, 2, 1)
    for key in ("final_val", "forget_quality", "retain_acc", "val_acc", "forget_acc"):
        assert after[key] == before[key]


def _crashed_study(params: dict, studies: Path):
    """A study as a killed `unlearnops tune` leaves it: the defaults' trial RUNNING, its heartbeat stopped."""
    import optuna

    setting, space, defaults = tune.study_config(params, "finetune")
    storage = tune._storage(params["tune"], studies / setting / "finetune.db")
    study = optuna.create_study(study_name=f"finetune-{tune.fingerprint(params, 'finetune', setting, space)}",
                                storage=storage, direction="maximize")
    study.enqueue_trial(defaults, user_attrs={"defaults": True})
    trial = study.ask()
    for key, spec in space.items():
        tune.suggest(trial, key, spec, defaults[key])
    storage.record_heartbeat(trial._trial_id)
    return defaults


def test_a_trial_left_running_by_a_crash_is_retried_on_resume(workdir, tmp_path, monkeypatch):
    root, params = workdir
    monkeypatch.chdir(root)
    params = copy.deepcopy(params)
    params["tune"]["n_trials"] = 2
    defaults = _crashed_study(params, tmp_path / "studies")
    summary = tune.tune(params, "finetune", out_dir=tmp_path / "out", studies_dir=tmp_path / "studies")

    states = {t["number"]: t["state"] for t in summary["trials"]}
    assert states[0] == "FAIL" and summary["n_finished"] == 2 and len(states) == 3
    retried = next(t for t in summary["trials"] if t["number"] == 1)
    assert retried["params"] == defaults and retried["defaults"] and retried["state"] == "COMPLETE"
    assert summary["defaults"]["value"] == retried["value"]


@pytest.mark.parametrize("change, message", [
    (lambda t: t["spaces"]["finetune"].update({"fit.lr": {"low": 0.5, "high": 0.1}}), "tune.spaces.finetune.fit.lr: low 0.5 > high 0.1"),
    (lambda t: t["spaces"]["finetune"].update({"fit.lr": {"low": 0.0, "high": 0.1, "log": True}}), "tune.spaces.finetune.fit.lr: a log scale needs low > 0"),
    (lambda t: t["spaces"]["finetune"].update({"fit.lr": {"low": 0.01, "high": 0.1, "lg": True}}), "tune.spaces.finetune.fit.lr.lg: unknown key"),
    (lambda t: t["spaces"]["finetune"].update({"fit.lrate": {"low": 0.01, "high": 0.1}}), "tune.spaces.finetune.fit.lrate: methods.finetune.fit.lrate is not a hyperparameter"),
    (lambda t: t["spaces"]["finetune"].update({"fit": {"low": 1, "high": 2}}), "tune.spaces.finetune.fit: methods.finetune.fit is not a hyperparameter"),
    (lambda t: t["spaces"]["finetune"].update({"fit.epochs": {"low": 1.5, "high": 3}}), "fit.epochs is an int, so low and high must be whole numbers"),
    (lambda t: t["spaces"]["finetune"].update({"fit.lr": {"low": 0.1, "high": 0.2, "choices": [0.1]}}), "give either choices or low/high/log"),
    (lambda t: t.update(n_trails=3), "tune.n_trails: unknown key"),
    (lambda t: t.update(setting="nowhere"), "tune.setting 'nowhere' is not one of"),
])
def test_bad_tune_params_are_one_line_errors_naming_the_key(repo_params, change, message):
    from unlearnops.params_schema import validate_params

    params = copy.deepcopy(repo_params)
    change(params["tune"])
    with pytest.raises(ConfigError) as err:
        validate_params(params)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_unknown_method_and_missing_stage(workdir, tmp_path, monkeypatch, capsys):
    from unlearnops import cli

    root, params = workdir
    monkeypatch.chdir(root)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert cli.main(["--params", str(path), "tune", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown method 'nope'; allowed:" in err and "finetune" in err
    other = copy.deepcopy(params)
    other["tune"]["setting"] = "synthetic-class-1"  # its forget set was never prepared
    path.write_text(yaml.safe_dump(other))
    assert cli.main(["--params", str(path), "tune", "finetune"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "run `dvc repro prepare@synthetic-class-1` first" in err


def test_sensitivity_section_shows_how_far_final_moves_across_good_trials(tmp_path):
    from unlearnops.files import write_json
    from unlearnops.report import sensitivity

    values = [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80]
    trials = [{"number": i, "state": "COMPLETE", "value": v, "feasible": True, "defaults": i == 0, "time_vs_retrain": 0.1,
               "params": {"fit.lr": 0.01 * (i + 1)}} for i, v in enumerate(values)]
    trials.append({"number": 8, "state": "COMPLETE", "value": 0.99, "feasible": False, "defaults": False, "time_vs_retrain": 0.5, "params": {}})
    trials.append({"number": 9, "state": "PRUNED", "value": None, "feasible": True, "defaults": False, "time_vs_retrain": 0.1, "params": {}})
    write_json(tmp_path / "tune" / "s1" / "finetune.json", {
        "method": "finetune", "setting": "s1", "n_models": 8, "n_finished": 10, "trials": trials,
        "defaults": {"value": 0.1}, "best": {"value": 0.8, "params": {"fit.lr": 0.08}}})
    frame, text, plots, files = sensitivity.build(tmp_path / "reports", tmp_path / "tune", ["s1", "s2"])
    row = frame.iloc[0]
    assert row["feasible"] == 8 and row["good"] == 2  # the top quarter; the infeasible 0.99 and the pruned trial left out
    assert row["good min"] == 0.7 and row["good max"] == 0.8 and row["good spread"] == pytest.approx(0.1)
    assert row["all feasible spread"] == pytest.approx(0.7) and row["defaults Final"] == 0.1
    assert "finetune" in text and all(p.is_file() and p.with_suffix(".csv").is_file() for p in plots.values())
    assert len(plots) == 2 and all(f.is_file() for f in files)  # s2 has no study: its plot says so


@pytest.mark.slow
def test_kill_9_mid_trial_then_resume_completes_the_study(workdir, tmp_path):
    """A real `unlearnops tune` killed with SIGKILL while a trial runs; the rerun retries that trial and
    finishes n_trials, every trial number once."""
    root, params = workdir
    params = copy.deepcopy(params)
    params["tune"]["n_trials"] = 3
    for folder in ("data", "models"):
        shutil.copytree(root / folder, tmp_path / folder)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "UNLEARNOPS_PROGRESS": "0"}
    command = [sys.executable, "-m", "unlearnops.cli", "tune", "finetune"]
    db = tmp_path / ".optuna" / SETTING / "finetune.db"

    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    running = 0
    while time.monotonic() < deadline and not running and process.poll() is None:
        time.sleep(0.5)
        if db.is_file():
            with sqlite3.connect(db) as con:
                try:  # a trial that has written an intermediate value is mid-run
                    running = con.execute("SELECT count(*) FROM trials t JOIN trial_intermediate_values v ON t.trial_id = v.trial_id "
                                          "WHERE t.state = 'RUNNING'").fetchone()[0]
                except sqlite3.OperationalError:  # tables not created yet
                    pass
    assert running, f"no trial reached its first chunk: {process.stderr.read().decode() if process.poll() is not None else ''}"
    process.send_signal(signal.SIGKILL)
    process.wait()

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT number, state FROM trials ORDER BY number").fetchall()
    numbers = [n for n, _ in rows]
    assert len(numbers) == len(set(numbers))
    assert [s for _, s in rows].count("FAIL") == 1 and sum(s in ("COMPLETE", "PRUNED") for _, s in rows) == 3
