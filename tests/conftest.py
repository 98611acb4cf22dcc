"""Shared fixtures: a tiny configuration of the real pipeline that runs in seconds on a CPU."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from prefect.testing.utilities import prefect_test_harness

from unlearnops import data as data_lib
from unlearnops.methods import UnlearnData
from unlearnops.nets import model_spec
from unlearnops.training import FitConfig, Runtime, Stream, train_from_scratch

REPO = Path(__file__).resolve().parents[1]


def tiny(params: dict) -> dict:
    """Shrink the repository's params.yaml to a seconds-long run on the synthetic data set."""
    params = copy.deepcopy(params)
    params["n_models"] = 4
    params["data"]["name"] = "synthetic"
    params["data"]["synthetic"].update(n_samples=400, n_classes=4, image_size=8, channels=1)
    params["forget"].update(mode="random", fraction=0.05)
    params["model"]["small_cnn"]["width"] = 4
    params["runtime"].update(device="cpu", models_per_pass=4, threads=1)  # one thread: tiny ops gain nothing from two, and lose badly on a busy machine
    params["train"]["fit"]["epochs"] = 6
    _cap_epochs(params["methods"], 2)
    params["unlearn"]["layered"] = []  # the runs a test makes are those its unlearn.methods names (test_pipeline adds layered)
    # a grid of two settings of one data set: a random forget set, and a class retrained models never saw
    params["datasets"] = {"synthetic": {}}
    params["settings"] = {
        "synthetic-random-5": {"dataset": "synthetic", "forget": {"mode": "random", "fraction": 0.05}},
        "synthetic-class-1": {"dataset": "synthetic", "forget": {"mode": "class", "class": 1}},
    }
    params["ops"].update(dataset="synthetic", benchmark_setting="synthetic-random-5")
    params["evaluate"]["ulira"]["settings"] = []  # U-LiRA's stage is off in the tiny grid (tests/test_ulira.py runs it)
    return params


def _cap_epochs(node, most: int) -> None:
    """Cap every `epochs` key nested anywhere in dicts and lists (e.g. methods.layered.stages)."""
    if isinstance(node, dict):
        if isinstance(node.get("epochs"), int):
            node["epochs"] = min(node["epochs"], most)
        for value in node.values():
            _cap_epochs(value, most)
    elif isinstance(node, list):
        for value in node:
            _cap_epochs(value, most)


@pytest.fixture()
def one_thread():
    """Torch on one thread for tests of many tiny tensor ops: a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture()
def tiny_params(repo_params, tmp_path) -> dict:
    params = tiny(repo_params)
    params["data"]["deleted"] = str(tmp_path / "deleted.csv")
    params["mlflow"].update(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "mlartifacts"))
    return params


def make_setup(params: dict, out: Path, target_epochs: int = 15, batch_size: int = 32):
    """Prepare data in `out` and train a target model: (params, data, unlearn_data, target, runtime)."""
    params["data"]["deleted"] = str(out / "deleted.csv")
    data_lib.prepare(params, out)
    data = data_lib.load_prepared(out)
    runtime = Runtime.from_params(params)
    spec = model_spec(params, data.num_classes, data.in_channels, data.image_size)
    cfg = FitConfig(**{**params["train"]["fit"], "epochs": target_epochs})
    target, _ = train_from_scratch(spec, [int(params["train"]["seed"])], Stream(data["train"].x, data["train"].y, batch_size), cfg, runtime, "target")
    unlearn_data = UnlearnData(data["retain"], data["forget"], data["val"], data.num_classes, augment=False)
    return params, data, unlearn_data, target, runtime


@pytest.fixture(scope="session")
def tiny_setup(repo_params, tmp_path_factory):
    """Prepared synthetic data (random 5% forget set) and a trained target, shared by method tests.

    Returns (params, data, unlearn_data, target_stack, runtime)."""
    return make_setup(tiny(repo_params), tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def class_forget_setup(repo_params, tmp_path_factory):
    """Like tiny_setup, but the forget set is a whole class, so retrained models score ~0 on it
    and any movement of a method toward retraining is large and easy to see."""
    params = tiny(repo_params)
    params["forget"].update(mode="class", **{"class": 1})
    return make_setup(params, tmp_path_factory.mktemp("prepared_class"))


def _default_setup(params: dict, out: Path):
    """Prepared data, a target trained with train.fit and `retrain.seed`'s first 4 retrained
    models, all with params.yaml's defaults: (params, data, unlearn_data, target, retrained, runtime)."""
    params, data, unlearn_data, target, runtime = make_setup(params, out, params["train"]["fit"]["epochs"], params["train"]["fit"]["batch_size"])
    spec = model_spec(params, data.num_classes, data.in_channels, data.image_size)
    fit = params["train"]["fit"]
    seeds = [int(params["retrain"]["seed"]) + i for i in range(4)]
    retrained, _ = train_from_scratch(spec, seeds, Stream(data["retain"].x, data["retain"].y, fit["batch_size"]), FitConfig(**fit), runtime, "retrain")
    return params, data, unlearn_data, target, retrained, runtime


@pytest.fixture(scope="session")
def digits_default_setup(repo_params, tmp_path_factory):
    """The default setting exactly as params.yaml gives it (digits, its random forget set, the
    default architecture and training), with a target and 4 retrained models: what whole-method
    tests with the users' default hyperparameters compare test accuracy against.

    Returns (params, data, unlearn_data, target_stack, retrained_stack, runtime)."""
    return _default_setup(copy.deepcopy(repo_params), tmp_path_factory.mktemp("digits_default"))


@pytest.fixture(scope="session")
def digits_class_setup(repo_params, tmp_path_factory):
    """The default grid's class setting (the `settings` entry whose forget mode is class): a whole
    class, which retrained models never see. On the random forget sets of digits the target hardly
    memorises its forget samples (its confidence on them is within the retrained models' spread),
    so "moves toward retraining" is measured here, where the two are far apart. Same returns as
    digits_default_setup."""
    from unlearnops.layout import setting_params

    name = next(n for n, s in repo_params["settings"].items() if s.get("forget", {}).get("mode") == "class")
    return _default_setup(setting_params(copy.deepcopy(repo_params), name), tmp_path_factory.mktemp("digits_class"))


def accuracy(stack, part, runtime) -> torch.Tensor:
    """Per-model accuracy of a stack on a data part: [N]."""
    from unlearnops.training import predict

    return (predict(stack, part.x, runtime).argmax(-1) == part.y).float().mean(1)


# What a working copy needs to run the pipeline (tune/: `unlearnops tune`'s results, a dependency of the report).
PIPELINE_FILES = ("dvc.yaml", "params.yaml", "stages", "unlearnops", "data/deleted.csv", "tune")


@pytest.fixture()
def repo_copy(tmp_path) -> Path:
    """The repository's pipeline files in a temporary folder (for end-to-end `dvc repro`)."""
    dest = tmp_path / "repo"
    dest.mkdir()
    for name in PIPELINE_FILES:
        src = REPO / name
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    return dest


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    updates = {PREFECT_HOME: str(tmp_path_factory.mktemp("prefect-home")), PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(updates=updates):
        # The temporary server can take a minute to start on a busy machine.
        with prefect_test_harness(server_startup_timeout=300):
            yield


def pytest_collection_modifyitems(config, items):
    """Tests that start a Prefect server (the `prefect_harness` fixture) belong to the slow tier, like
    the real `dvc repro` and the `serve` subprocess: `pytest -m "not slow"` (make test-fast) skips them."""
    for item in items:
        if "prefect_harness" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
