"""`unlearnops repro` checks params.yaml before any stage runs (fast): one line per problem, exit 2, no dvc."""
from __future__ import annotations

import copy

import pytest
import yaml

from unlearnops import cli, validate


def test_the_default_params_pass(repo_params):
    assert validate.problems(repo_params) == []


@pytest.mark.parametrize("change, expected", [
    (lambda p: p["unlearn"]["methods"].append("finetuen"), "unlearn.methods: unknown method 'finetuen'; allowed: a_amu,"),
    (lambda p: p["condense"].update(methods=["blendy"]), "condense.methods: unknown method 'blendy'"),
    (lambda p: p["model"].update(arch="vgg"), "datasets.digits: unknown architecture 'vgg'; allowed: small_resnet"),
    (lambda p: p["datasets"].update(cifar={"data": {"name": "cifar"}}), "datasets.cifar: unknown dataset 'cifar'; allowed: digits, cifar10"),
    (lambda p: p["settings"].update(x={"dataset": "nope"}), "settings.x: unknown dataset 'nope'"),
    (lambda p: p["settings"].update({"a.b": {"dataset": "digits"}}), "settings.a.b:"),
    (lambda p: p["settings"]["digits-random-2"]["forget"].update(mode="users_"), "settings.digits-random-2.forget: unknown forget mode 'users_'"),
    (lambda p: p["methods"]["scrub"].update(alpha_typo=1), "methods.scrub: unknown key(s) ['alpha_typo']"),
    (lambda p: p["ops"].update(benchmark_setting="digits-random-3"), "ops.benchmark_setting: unknown ops.benchmark_setting"),
    (lambda p: p["ops"].update(method="magic"), "ops.method: unknown method 'magic'"),
])
def test_each_problem_is_one_line_naming_the_key(repo_params, change, expected):
    params = copy.deepcopy(repo_params)
    change(params)
    found = validate.problems(params)
    assert any(line.startswith(expected) for line in found), found
    assert all("\n" not in line for line in found)
    assert len(found) == len(set(found)) == 1  # said once, even where every setting meets it


def test_repro_stops_before_dvc_on_bad_params(repo_params, tmp_path, monkeypatch, capsys):
    params = copy.deepcopy(repo_params)
    params["unlearn"]["methods"] = ["finetune", "finetuen"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    called = []
    monkeypatch.setattr(cli.subprocess, "call", lambda *a, **k: called.append(a) or 0)
    assert cli.main(["--params", str(path), "repro"]) == 2
    assert not called
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: unlearn.methods: unknown method 'finetuen'; allowed: " + err[0].split("allowed: ")[1]]
