"""The pipeline over the settings grid: the settings merge and the report builders (fast), and the
real `unlearnops repro` (dvc repro) on a tiny two-setting grid in a temporary copy of the
repository (slow): its outputs per setting, what reruns after a change, `dvc metrics show`, the
report, MLflow, and the stage entry points' handling of bad input."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import PIPELINE_FILES, REPO, tiny
from unlearnops import layout
from unlearnops.config import ConfigError

BIN = Path(sys.executable).parent
METHODS = ["finetune", "neggrad_plus"]  # the grid's `unlearn` matrix, reduced
RUNS = [*METHODS, "layered", "finetune+blend"]  # + the composite (layered over neggrad_plus) and a condensed run


# ---------------------------------------------------------------- the settings merge (fast)


def test_setting_params_merge_data_set_and_forget_overrides(repo_params):
    params = copy.deepcopy(repo_params)
    params["datasets"]["tiny"] = {"data": {"name": "synthetic"}, "model": {"arch": "small_cnn"}}
    params["settings"]["tiny-users"] = {"dataset": "tiny", "forget": {"mode": "users", "n_users": 2}}
    merged = layout.setting_params(params, "tiny-users")
    assert merged["data"]["name"] == "synthetic" and merged["model"]["arch"] == "small_cnn"
    assert merged["forget"] == {**params["forget"], "mode": "users", "n_users": 2}
    assert merged["model"]["small_resnet"] == params["model"]["small_resnet"]  # nested sections merge key by key
    assert params["forget"]["mode"] == repo_params["forget"]["mode"]  # the global sections are left alone
    for name in layout.settings(repo_params):  # the default grid: digits, two random sizes and a class
        assert layout.setting_params(repo_params, name)["data"]["name"] == "digits"
    fractions = {layout.setting_params(repo_params, s)["forget"].get("fraction") for s in repo_params["settings"]
                 if repo_params["settings"][s]["forget"]["mode"] == "random"}
    assert {0.005, 0.02} <= fractions
    assert any(s["forget"]["mode"] == "class" for s in repo_params["settings"].values())
    where = layout.setting_layout(repo_params, "digits-random-2")
    assert where.target == Path("models/digits/target") and where.retrain == Path("models/digits-random-2/retrain")


@pytest.mark.parametrize("change, message", [
    (lambda p: p["settings"].update({"bad/name": {"dataset": "digits"}}), "settings name 'bad/name' must be letters, digits"),
    (lambda p: p["settings"].update({"digits-random-0.5": {"dataset": "digits"}}), r"settings name 'digits-random-0.5' must be .* no '\.'"),
    (lambda p: p["settings"].update({"x": {"dataset": "mnist"}}), "unknown dataset 'mnist'; allowed: digits"),
    (lambda p: p["settings"].update({"x": {"dataset": "digits", "forgt": {}}}), r"settings.x: unknown key\(s\) \['forgt'\]; allowed: dataset, forget"),
    (lambda p: p["settings"].update({"x": {"dataset": "digits", "forget": {"fractoin": 0.1}}}), "settings.x.forget: unknown key 'fractoin'; allowed: mode"),
    (lambda p: p["settings"].update({"x": {"forget": {"mode": "class"}}}), "settings.x needs a dataset"),
    (lambda p: p["datasets"].update({"digits": {"optimizer": "adam"}}), r"datasets.digits: unknown key\(s\) \['optimizer'\]; allowed: data, model, train"),
    (lambda p: p["datasets"].update({"digits": {"model": {"arch_": "x"}}}), "datasets.digits.model: unknown key 'arch_'"),
    (lambda p: p.update(settings={}), "params.yaml has no settings"),
])
def test_bad_settings_are_one_line_errors(repo_params, change, message):
    params = copy.deepcopy(repo_params)
    change(params)
    with pytest.raises(ConfigError, match=message) as err:
        layout.settings(params)
    assert "\n" not in str(err.value)


def test_auto_method_reads_the_benchmark_setting_only(repo_params, tmp_path, monkeypatch):
    from unlearnops.ops import deletion

    monkeypatch.chdir(tmp_path)
    params = copy.deepcopy(repo_params)
    for setting, scores in (("digits-random-2", {"finetune": 0.2, "scrub": 0.3}), ("digits-class-0", {"finetune": 0.9})):
        for method, score in scores.items():
            path = layout.setting_layout(params, setting).evidence / f"{method}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"method": method, "final_score": {"estimate": score, "low": score, "high": score}}))
    params["ops"]["benchmark_setting"] = "digits-random-2"
    assert deletion.choose_method(params)[0] == "scrub"
    params["ops"]["benchmark_setting"] = "digits-class-0"
    assert deletion.choose_method(params)[0] == "finetune"
    params["ops"]["benchmark_setting"] = "nope"
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        deletion.choose_method(params)


def test_spooled_stage_runs_are_logged_later_with_their_times(tiny_params, tmp_path, monkeypatch):
    from unlearnops import tracking

    monkeypatch.setenv(tracking.SPOOL_ENV, str(tmp_path / "spool"))
    with tracking.stage_run(tiny_params, "unlearn", {"hparams": {"lr": 0.1}}, run_name="unlearn-x") as (logger, run):
        assert run is None and "mlflow" not in type(logger).__module__
        logger.log_metrics({"seconds_per_model": 2.0})
        logger.log_metric("relearn.F1.accuracy_on_T", 0.5, step=3)
        logger.set_tag("unlearnops.models", "models/x")
    with pytest.raises(RuntimeError), tracking.stage_run(tiny_params, "evaluate", {}, run_name="evaluate-x"):
        raise RuntimeError("a failing stage")
    assert len(list((tmp_path / "spool").glob("*.json"))) == 2
    monkeypatch.delenv(tracking.SPOOL_ENV)
    mlflow = tracking.configure(tiny_params)
    with mlflow.start_run(run_name="pipeline") as parent:
        pass
    assert tracking.replay(tiny_params, tmp_path / "spool", parent.info.run_id) == 2
    assert not list((tmp_path / "spool").glob("*.json"))
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=[tiny_params["mlflow"]["experiment"]], output_format="list")}
    logged = runs["unlearn-x"]
    assert logged.data.tags["mlflow.parentRunId"] == parent.info.run_id and logged.data.tags["unlearnops.stage"] == "unlearn"
    assert logged.data.params["hparams.lr"] == "0.1" and logged.data.metrics["seconds_per_model"] == 2.0
    assert logged.data.tags["unlearnops.models"] == "models/x" and logged.info.status == "FINISHED"
    assert logged.info.start_time <= logged.info.end_time < runs["evaluate-x"].info.end_time
    history = mlflow.tracking.MlflowClient().get_metric_history(logged.info.run_id, "relearn.F1.accuracy_on_T")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
    assert runs["evaluate-x"].info.status == "FAILED"


# ---------------------------------------------------------------- the report builders (fast)


def _fake_setting(finals: dict[str, tuple[float, float, float]], times: dict[str, float], floor: tuple[float, float, float], budget: float = 0.2):
    """A SettingResults with only the numbers the tables read: name -> (estimate, low, high), time / retrain."""
    from unlearnops.report import SettingResults

    res = SettingResults.__new__(SettingResults)
    res.budget = budget
    res.retrain = {"accuracy": {"test": {"mean": 0.9}, "forget": {"mean": 0.8}}, "seconds_per_model": 10.0}
    score = lambda e, lo, hi: {"estimate": e, "low": lo, "high": hi}  # noqa: E731
    res.floor = {"final_score": score(*floor)}
    res.metrics = {name: {"final_score": score(*f), "accuracy": {"test": {"mean": 0.95}, "forget": {"mean": 0.97}},
                          "seconds_per_model": 10.0 * times[name], "time_vs_retrain": times[name]} for name, f in finals.items()}
    return res


def test_report_tables_group_columns_by_setting_and_rank_methods(tmp_path):
    from unlearnops import report

    results = {
        "a": _fake_setting({"fast": (0.30, 0.25, 0.35), "slow": (0.10, 0.05, 0.12)}, {"fast": 0.05, "slow": 0.5}, (0.4, 0.3, 0.45)),
        "b": _fake_setting({"fast": (0.02, 0.01, 0.03), "slow": (0.20, 0.15, 0.25)}, {"fast": 0.1, "slow": 0.3}, (0.5, 0.4, 0.55)),
    }
    numbers = report.table_numbers(results)
    assert list(numbers["method"]) == ["fast", "slow", report.RETRAIN_ROW]
    assert numbers.loc[1, "a Final"] == 0.10 and numbers.loc[2, "b Final"] == 0.5
    assert list(numbers["a over budget"]) == [False, True, False] and list(numbers["b over budget"]) == [False, True, False]

    shown = report.table_shown(results)
    assert list(shown.columns.get_level_values(0).unique()) == ["a", "b"]
    assert set(shown.columns.get_level_values(1)) == {"Final", "Test", "Forget", "Time [s]", "Time / retrain"}
    assert shown.loc["slow", ("a", "Time / retrain")] == f"0.50 {report.OVER_BUDGET}"
    assert shown.loc[report.RETRAIN_ROW, ("a", "Time / retrain")] == "1.00"  # retrain is the reference, never flagged
    assert shown.loc["fast", ("b", "Final")] == "0.020 [0.010, 0.030]"
    assert f"{report.OVER_BUDGET} time / retrain above evaluate.time_budget = 0.2" in report.table_markdown(shown, 0.2)

    general = report.generality(results)  # fast: ranks 1, 2; slow: ranks 2, 1 -> tie on mean rank, slow's worst Final is higher
    assert list(general["method"]) == ["slow", "fast"]
    row = general.set_index("method").loc["fast"]
    assert (row["rank a"], row["rank b"], row["mean rank"], row["worst Final"], row["worst setting"]) == (1, 2, 1.5, 0.02, "b")
    assert general.set_index("method").loc["slow", "over budget in"] == "a, b" and row["over budget in"] == ""
    assert row["time rank"] == 1
    text = report.reading(results, general)
    assert "Most general: **slow**" in text and "changes from setting to setting" in text and "slow (a, b)" in text


def test_disjoint_ranks_use_each_model_once(monkeypatch):
    from unlearnops import report
    from unlearnops.outputs import RunOutputs

    rng = np.random.default_rng(0)
    n, classes = 8, 3

    def run(shift: float) -> RunOutputs:
        logits = {s: rng.normal(size=(n, 12, classes)).astype(np.float32) + shift for s in ("retain", "forget", "test")}
        labels = {s: rng.integers(0, classes, 12) for s in logits}
        return RunOutputs(logits, labels, {s: np.arange(12) for s in logits}, np.ones(n), float(n))

    res = report.SettingResults.__new__(report.SettingResults)
    res.retrained, res.outputs = run(0.0), {"m1": run(0.0), "m2": run(1.0)}
    seen = []
    real = report.epsilon.per_example_epsilons
    monkeypatch.setattr(report.epsilon, "per_example_epsilons", lambda u, r: seen.append(u.shape[0]) or real(u, r))
    long = report.disjoint_ranks(res, (2, 4), seed=0)
    assert set(long["groups"]) == {2, 4} and set(long.loc[long["groups"] == 4, "models"]) == {2}
    assert len(long) == 2 * (2 + 4) and seen == [4] * 4 + [2] * 8
    for _, group in long.groupby(["groups", "part"]):
        assert sorted(group["rank"]) in ([1, 2], [1, 1])


# ---------------------------------------------------------------- the real pipeline (slow)


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def pipeline_run(repo_params, tmp_path_factory):
    """One tiny `unlearnops repro` of the grid: two settings (a random 5% and a class), two methods,
    Layered Unlearning over one of them (unlearn_layered) and one on a Blend-condensed retain set."""
    root = tmp_path_factory.mktemp("e2e")
    for name in (f for f in PIPELINE_FILES if f != "params.yaml"):  # params.yaml: this test's own, below
        src = REPO / name
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    params = tiny(repo_params)
    params["unlearn"]["methods"] = METHODS
    params["unlearn"]["layered"] = ["layered"]
    params["methods"]["layered"]["base"] = "neggrad_plus"
    params["condense"]["methods"] = ["finetune"]
    write_params(root, params)
    run(["dvc", "init", "--no-scm", "-q"], root)
    run([str(BIN / "unlearnops"), "repro"], root)
    return root, params


def dry_run(root: Path, params: dict, change=None, edit: str | None = None) -> set[str]:
    """The stages `dvc repro --dry` would run after `change(params)` or after appending a comment to
    the file `edit`; both are restored after."""
    changed = copy.deepcopy(params)
    if change is not None:
        change(changed)
    write_params(root, changed)
    source = (root / edit).read_text() if edit else None
    if edit:
        (root / edit).write_text(source + "\n# edited\n")
    try:
        out = run(["dvc", "repro", "--dry"], root).stdout
    finally:
        write_params(root, params)
        if edit:
            (root / edit).write_text(source)
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


@pytest.mark.slow
def test_repro_produces_every_output_per_setting(pipeline_run):
    root, params = pipeline_run
    n = params["n_models"]
    assert (root / "data/split/synthetic/images.pt").is_file()
    folders = [("models/synthetic/target", 1)]
    for setting in params["settings"]:
        assert (root / f"data/prepared/{setting}/samples.csv").is_file()
        folders += [(f"models/{setting}/retrain", n)] + [(f"models/{setting}/unlearned/{m}", n) for m in RUNS]
        for run_name in RUNS:
            evidence = json.loads((root / f"evaluation/{setting}/{run_name}.json").read_text())
            assert evidence["n_models"] == n and 0 <= evidence["accuracy"]["test"]["mean"] <= 1
            headline = json.loads((root / f"metrics/{setting}/{run_name}.json").read_text())
            assert headline["final"] == evidence["final_score"]["estimate"] and len(headline) <= 12  # small, flat
            assert all(not isinstance(v, (dict, list)) for v in headline.values())
    for folder, expected_n in folders:
        with np.load(root / folder / "logits.npz") as logits:
            assert logits["test"].shape[:2] == (expected_n, len(logits["test_labels"])), folder
    # each setting has its own forget set; the class setting's forget set is the whole class
    forget = {s: pd.read_csv(root / f"data/prepared/{s}/samples.csv").query("forget") for s in params["settings"]}
    assert set(forget["synthetic-class-1"]["label"]) == {1} and len(forget["synthetic-random-5"]) < len(forget["synthetic-class-1"])
    for kind in ("confidences", "epsilons", "final_vs_time", "relearn"):  # each plot, and its data beside it for `dvc plots`
        for setting in params["settings"]:
            assert (root / f"reports/plots/{kind}/{setting}.png").read_bytes()[:4] == b"\x89PNG"
            assert len(pd.read_csv(root / f"reports/plots/{kind}/{setting}.csv")) > 0
            assert (root / "summary" / f"{setting}.json").is_file()
    page = (root / "reports/index.html").read_text()
    assert page.count("data:image/png;base64,") == 5 * len(params["settings"]) and "src='http" not in page


@pytest.mark.slow
def test_report_table_has_a_column_group_per_setting_and_intervals_contain_estimates(pipeline_run):
    root, params = pipeline_run
    table = pd.read_csv(root / "reports/table.csv")
    assert list(table["method"]) == [*RUNS, "retrain (half vs half)"]
    for setting in params["settings"]:
        for measure in ("Final", "Final low", "Final high", "Test", "Forget", "Time [s]", "Time / retrain", "over budget"):
            assert f"{setting} {measure}" in table.columns
        low, estimate, high = (table[f"{setting} Final{part}"] for part in (" low", "", " high"))
        assert ((low <= estimate) & (estimate <= high)).all(), table[["method", f"{setting} Final low", f"{setting} Final", f"{setting} Final high"]]
        assert table[f"{setting} Time / retrain"].iloc[-1] == 1.0
    header = (root / "reports/table.md").read_text().splitlines()[0]
    assert all(f"{s}: Final" in header for s in params["settings"])
    html = (root / "reports/table.html").read_text()
    assert all(f">{s}</th>" in html for s in params["settings"])  # the grouped header
    general = pd.read_csv(root / "reports/generality.csv")
    assert sorted(general["method"]) == sorted(RUNS)
    assert all(f"rank {s}" in general.columns for s in params["settings"])
    assert "Most general:" in (root / "reports/reading.md").read_text()


@pytest.mark.slow
def test_dvc_metrics_show_lists_each_setting_and_nothing_reruns(pipeline_run):
    root, params = pipeline_run
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    files = next(iter(shown.values()))["data"]
    assert set(files) == {f"summary/{setting}.json" for setting in params["settings"]}  # one compact file per setting, nothing else
    from unlearnops.tracking import flatten

    columns = {key for entry in files.values() for key in flatten(entry["data"])}
    runs = layout.run_names(params)
    assert len(columns) == 6 * (len(runs) + 1), sorted(columns)  # per run and retrain: Final, its interval, test, forget, time
    assert "changed" not in run(["dvc", "status"], root).stdout


@pytest.mark.slow
def test_changing_one_method_reruns_only_that_method_in_every_setting(pipeline_run):
    root, params = pipeline_run
    stages = dry_run(root, params, lambda p: p["methods"]["finetune"]["fit"].update(lr=0.01))
    assert {f"unlearn@{s}-finetune" for s in params["settings"]} <= stages
    assert not any("neggrad_plus" in s or s.startswith(("retrain", "train_target", "prepare")) for s in stages), stages


@pytest.mark.slow
@pytest.mark.parametrize("edit, reruns", [
    ("unlearnops/methods/finetune.py", {"unlearn@{s}-finetune", "unlearn_blend@{s}-finetune"}),
    ("unlearnops/methods/neggrad_plus.py", {"unlearn@{s}-neggrad_plus", "unlearn_layered@{s}-layered"}),  # layered runs neggrad_plus
    ("unlearnops/methods/layered.py", {"unlearn_layered@{s}-layered"}),
    ("unlearnops/condense.py", {"unlearn_blend@{s}-finetune"}),
])
def test_editing_one_module_reruns_the_stages_that_run_it_only(pipeline_run, edit, reruns):
    """dvc.yaml's per-method deps, seen by DVC itself (tests/test_dvc_deps.py checks them statically)."""
    root, params = pipeline_run
    stages = dry_run(root, params, edit=edit)
    expected = {name.format(s=s) for s in params["settings"] for name in reruns}
    assert {s for s in stages if s.startswith("unlearn")} == expected
    assert not any(s.startswith(("split", "prepare", "inputs", "train_target", "retrain")) for s in stages), stages


@pytest.mark.slow
def test_changing_the_base_methods_params_reruns_layered(pipeline_run):
    root, params = pipeline_run
    stages = dry_run(root, params, lambda p: p["methods"]["neggrad_plus"].update(alpha=0.9))
    assert {s for s in stages if s.startswith("unlearn")} == {f"{g}@{s}-{m}" for s in params["settings"]
                                                             for g, m in (("unlearn", "neggrad_plus"), ("unlearn_layered", "layered"))}


@pytest.mark.slow
def test_changing_one_setting_reruns_only_that_setting(pipeline_run):
    root, params = pipeline_run
    stages = dry_run(root, params, lambda p: p["settings"]["synthetic-random-5"]["forget"].update(fraction=0.1))
    assert "prepare@synthetic-random-5" in stages
    assert not any("synthetic-class-1" in s for s in stages), stages
    assert not any(s.startswith(("split", "train_target")) for s in stages), stages  # same data set: same target


@pytest.mark.slow
def test_mlflow_has_one_parent_and_nested_stage_runs(pipeline_run):
    import mlflow

    root, params = pipeline_run
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[params["mlflow"]["experiment"]], output_format="list")
    parents = [r for r in runs if r.data.tags.get("unlearnops.stage") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {r.data.tags["unlearnops.stage"] for r in children} == {"prepare", "target", "retrain", "unlearn", "evaluate", "report"}
    names = {r.info.run_name for r in children}
    assert {f"unlearn-{s}-finetune" for s in params["settings"]} <= names and "target-synthetic" in names
    retrain = next(r for r in children if r.info.run_name == "retrain-synthetic-class-1")
    assert retrain.data.params["n_models"] == str(params["n_models"]) and "accuracy.test.mean" in retrain.data.metrics
    # only the target, the deletion flow's first champion, is logged as an MLflow model (the rest are DVC outputs)
    models = mlflow.search_logged_models(experiment_ids=[parents[0].info.experiment_id], output_format="list")
    target = next(r for r in children if r.info.run_name == "target-synthetic")
    assert models and {m.source_run_id for m in models} == {target.info.run_id}


@pytest.mark.slow
def test_bad_inputs_fail_with_one_line_and_damage_nothing(pipeline_run):
    root, params = pipeline_run
    kept = (root / "models/synthetic-random-5/unlearned/finetune/models.pt").read_bytes()

    result = run([sys.executable, "stages/unlearn.py", "magic", "--setting", "synthetic-random-5"], root, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unlearn: unknown method 'magic'; allowed:")
    result = run([sys.executable, "stages/unlearn.py", "finetune", "--setting", "nope"], root, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: unlearn: unknown setting 'nope'; allowed: synthetic-random-5")

    target = root / "models/synthetic/target/models.pt"
    original = target.read_bytes()
    try:
        target.write_bytes(b"not a checkpoint")
        result = run([sys.executable, "stages/unlearn.py", "finetune", "--setting", "synthetic-random-5"], root, check=False)
        assert result.returncode == 2
        assert "corrupt checkpoint" in result.stderr and "models/synthetic/target/models.pt" in result.stderr
        assert (root / "models/synthetic-random-5/unlearned/finetune/models.pt").read_bytes() == kept
    finally:
        target.write_bytes(original)

    bad = yaml.safe_load((root / "params.yaml").read_text())
    bad["model"]["arch"] = "vgg"
    (root / "bad.yaml").write_text(yaml.safe_dump(bad))
    env = {**os.environ, "UNLEARNOPS_PARAMS": "bad.yaml", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "stages/train_target.py", "synthetic"], cwd=root, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "model.arch must be one of 'small_resnet'" in result.stderr and "got 'vgg'" in result.stderr
    assert target.read_bytes() == original


def test_dvc_exp_run_set_param_leaves_params_yaml_as_it_is(tmp_path):
    """`dvc exp run -S key=value` rewrites params.yaml with DVC's own YAML round trip: only that
    value may change (no expanded merge keys, dropped nulls or re-wrapped lists)."""
    from dvc.utils.serialize import modify_yaml

    copy_path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", copy_path)
    with modify_yaml(copy_path) as params:
        params["methods"]["finetune"]["fit"]["lr"] = 0.0123
    before, after = (REPO / "params.yaml").read_text().splitlines(), copy_path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1 and "0.0123" in changed[0][1]
