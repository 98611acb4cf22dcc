"""Commands that do not train start fast (fast): they import only what they use. Checked in a fresh
interpreter by the modules loaded, not by the clock (the clock depends on the machine's load)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlflow", "sklearn", "onnx", "onnxruntime", "prefect", "matplotlib")


def _loaded_after(args: list[str], cwd: Path) -> dict:
    code = ("import json, sys\nfrom unlearnops.cli import main\ncode = main(sys.argv[1:])\n"
            f"print(json.dumps({{'code': code, 'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("UNLEARNOPS_LEDGER_URL", None)
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def workdir(repo_params, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(repo_params))
    return tmp_path


def test_help_and_the_ledger_commands_load_no_heavy_library(workdir):
    code = f"import sys\nfrom unlearnops import cli\ncli.build_parser()\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    parser = subprocess.run([sys.executable, "-c", code], cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, check=False)
    assert parser.stdout.strip() == "[]", parser.stderr
    assert _loaded_after(["request", "list"], workdir) == {"code": 0, "heavy": []}


def test_review_list_loads_mlflow_but_not_torch_or_onnx(workdir):
    loaded = _loaded_after(["review", "list"], workdir)
    assert loaded["code"] == 0 and loaded["heavy"] == ["mlflow"]


def test_the_ledger_and_samples_table_follow_params_and_the_environment(repo_params, tmp_path, monkeypatch):
    from unlearnops.layout import samples_table
    from unlearnops.ops.ledger import LEDGER_ENV, open_ledger

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(LEDGER_ENV, raising=False)
    assert str(open_ledger(repo_params).engine.url) == repo_params["ops"]["ledger_url"]
    url = f"sqlite:///{tmp_path}/other.db"
    monkeypatch.setenv(LEDGER_ENV, url)
    assert str(open_ledger(repo_params).engine.url) == url
    for folder in (Path("data/prepared"), Path("data/split") / repo_params["ops"]["dataset"]):  # flat layout, then the grid's
        folder.mkdir(parents=True)
        (folder / "samples.csv").write_text("sample_id\n")
        assert samples_table(repo_params) == folder / "samples.csv"
