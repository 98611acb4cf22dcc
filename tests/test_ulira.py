"""U-LiRA (unlearnops.ulira, unlearnops.metrics.ulira): the attack tells memorised examples from unseen
ones with real models, the leave-one-split-out Gaussians, the engine's per-model rows, and the
pipeline stage end to end on the tiny grid."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from scipy.stats import norm

from conftest import tiny
from unlearnops import ulira as ulira_lib
from unlearnops.config import ConfigError
from unlearnops.data import Part
from unlearnops.metrics import ulira as ulira_math
from unlearnops.training import FitConfig, Runtime, Stream, train_from_scratch

pytestmark = pytest.mark.usefixtures("one_thread")

CNN = {"arch": "small_cnn", "num_classes": 4, "in_channels": 1, "image_size": 8, "options": {"width": 8}}
CPU = Runtime("cpu", models_per_pass=16)


def _cfg(params: dict, **changes) -> ulira_lib.UliraConfig:
    return ulira_lib.UliraConfig(**{**params["evaluate"]["ulira"], **changes})


def test_per_model_rows_train_each_model_as_alone_on_its_subset(tiny_setup):
    _, data, _, _, _ = tiny_setup
    x, y = data["train"].x, data["train"].y
    fit = FitConfig(epochs=3, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")
    generator = torch.Generator().manual_seed(0)
    rows = torch.stack([torch.randperm(len(x), generator=generator)[:150] for _ in range(3)])
    together, _ = train_from_scratch(CNN, [5, 6, 7], Stream(x, y, 32, rows=rows), fit, CPU, "rows")
    for i, seed in enumerate([5, 6, 7]):
        alone, _ = train_from_scratch(CNN, [seed], Stream(x[rows[i]], y[rows[i]], 32), fit, CPU, "alone")
        for name, value in alone.params.items():
            torch.testing.assert_close(together.params[name][i], value[0], rtol=1e-4, atol=1e-5)
    # and the rows matter: model 0 on model 1's rows is another model
    swapped, _ = train_from_scratch(CNN, [5], Stream(x[rows[1]], y[rows[1]], 32), fit, CPU, "swapped")
    assert max((swapped.params[k][0] - together.params[k][0]).abs().max().item() for k in swapped.params) > 1e-3


def test_likelihood_ratios_fit_gaussians_without_the_scored_split():
    rng = np.random.default_rng(0)
    k, per, n_examples = 5, 3, 7
    split = np.repeat(np.arange(k), per)
    member = np.repeat(rng.random((k, n_examples)) < 0.5, per, axis=0)
    member[:, 0] = np.repeat([True, False, True, False, True], per)  # every example in and out somewhere
    conf = rng.normal(size=member.shape) + 2.0 * member
    for fixed in (False, True):
        scores = ulira_math.likelihood_ratios(conf, member, split, fixed_variance=fixed)
        for held in range(k):
            shadow = split != held
            c, m = conf[shadow], member[shadow]
            for e in range(n_examples):
                if not (m[:, e].any() and (~m[:, e]).any()):
                    assert np.isnan(scores[split == held, e]).all()
                    continue
                sides = []
                for side in (m, ~m):
                    values = c[side[:, e], e]
                    if fixed:  # residuals of every example around its own mean, one variance per side
                        residuals = np.concatenate([c[side[:, j], j] - c[side[:, j], j].mean() for j in range(n_examples) if side[:, j].any()])
                        dof = side.sum() - sum(side[:, j].any() for j in range(n_examples))
                        sd = np.sqrt((residuals**2).sum() / dof)
                    else:
                        sd = values.std(ddof=1) if len(values) > 1 else 1e-3
                    sides.append(norm(values.mean(), max(sd, 1e-3)))
                expected = sides[0].logpdf(conf[split == held, e]) - sides[1].logpdf(conf[split == held, e])
                if fixed or min(m[:, e].sum(), (~m[:, e]).sum()) > 1:
                    np.testing.assert_allclose(scores[split == held, e], expected, rtol=1e-9, atol=1e-9)
        # a split's own confidences never enter its Gaussians: moving them shifts its scores only through c
        moved = conf.copy()
        moved[split == 0] += 100.0
        again = ulira_math.likelihood_ratios(moved, member, split, fixed_variance=fixed)
        assert not np.allclose(again[split == 1], scores[split == 1], equal_nan=True)  # split 0 is split 1's shadow
        flipped = member.copy()
        flipped[split == 0] = ~flipped[split == 0]
        np.testing.assert_array_equal(ulira_math.likelihood_ratios(conf, flipped, split, fixed)[split == 0], scores[split == 0])


def test_attack_metrics_on_separated_and_identical_score_distributions():
    rng = np.random.default_rng(1)
    member = np.arange(4000) < 2000
    separated = ulira_math.attack_metrics(rng.normal(size=4000) + 6.0 * member, member)
    assert separated["auc"] > 0.99 and separated["accuracy"] > 0.98 and separated["tpr_at_0.001_fpr"] > 0.5
    same = ulira_math.attack_metrics(rng.normal(size=4000), member)
    assert abs(same["auc"] - 0.5) < 0.05 and same["tpr_at_0.01_fpr"] < 0.05 and same["n_out"] == 2000


@pytest.fixture(scope="module")
def canaries(tiny_setup):
    """The tiny setting with its forget set relabelled (y + 1): only a model trained on an example
    can be confident of its label, so memorised vs never seen is the known answer."""
    params, data, _, _, runtime = tiny_setup
    forget = data["forget"]
    forget = Part(forget.x, (forget.y + 1) % data.num_classes, forget.ids)
    cfg = _cfg(params, splits=8, runs_per_split=2, examples=20)
    splits = ulira_lib.choose_splits(len(forget), cfg)
    # enough capacity and epochs to fit 7 wrong labels among 360 (12 epochs of width 8 do not: AUC 0.56)
    fit = FitConfig(**{**params["train"]["fit"], "epochs": 30, "batch_size": 32})
    spec = {**CNN, "options": {"width": 16}}
    shadows = ulira_lib.train_shadows(spec, data["retain"], forget, splits, cfg, fit, runtime, augment=False)
    return cfg, data, forget, splits, spec, fit, shadows, runtime


def test_memorised_examples_are_found_and_never_seen_ones_are_not(canaries):
    cfg, data, forget, splits, spec, fit, shadows, runtime = canaries
    assert splits.member.sum(1).tolist() == [len(splits.pool) // 2] * cfg.splits
    # memorised: the shadow targets themselves (trained on their half, nothing unlearned)
    kept = ulira_lib.unlearn_shadows(lambda originals, forget_k: originals, shadows, forget, splits, cfg)
    split, member = ulira_lib.runs_of_splits(kept.n, splits, cfg.runs_per_split)
    memorised, arrays = ulira_lib.attack(ulira_lib.confidences(kept, forget, splits, runtime), split, member, cfg)
    assert memorised["auc"] > 0.95 and memorised["accuracy"] > 0.9, memorised
    assert np.nanmin(arrays["example_auc"]) > 0.7
    # never seen: exact unlearning, models retrained from scratch on retain (one per run, in one engine call)
    retrained, _ = train_from_scratch(spec, kept.seeds, Stream(data["retain"].x, data["retain"].y, fit.batch_size), fit, runtime, "retrain")
    unseen, _ = ulira_lib.attack(ulira_lib.confidences(retrained, forget, splits, runtime), split, member, cfg)
    assert abs(unseen["auc"] - 0.5) < 0.12 and unseen["accuracy"] < 0.65, unseen
    assert unseen["n_in"] + unseen["n_out"] + unseen["n_unscored"] == kept.n * len(splits.pool)


def test_bad_ulira_params_are_one_line_errors(repo_params):
    from unlearnops.params_schema import validate_params

    params = copy.deepcopy(repo_params)
    params["evaluate"]["ulira"]["splits"] = 1
    with pytest.raises(ConfigError, match="evaluate.ulira.splits"):
        validate_params(params)
    params = copy.deepcopy(repo_params)
    params["evaluate"]["ulira"]["settings"] = ["digits-random-7"]
    with pytest.raises(ConfigError, match="evaluate.ulira.settings: 'digits-random-7' is not one of"):
        validate_params(params)
    with pytest.raises(ConfigError, match="evaluate.ulira.runs_per_split: must be >= 1"):
        ulira_lib.config_from({"evaluate": {"ulira": {**repo_params["evaluate"]["ulira"], "runs_per_split": 0}}})
    with pytest.raises(ConfigError, match="at least 2 examples"):
        ulira_lib.choose_splits(1, _cfg(repo_params))


def test_ulira_stage_on_the_tiny_grid(repo_params, tmp_path, monkeypatch):
    from unlearnops import pipeline

    params = tiny(repo_params)
    setting = "synthetic-random-5"
    params["data"]["deleted"] = str(tmp_path / "deleted.csv")
    params["mlflow"].update(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "mlartifacts"))
    params["unlearn"]["methods"] = ["finetune"]
    params["condense"]["methods"] = ["finetune"]  # a condensed run: its own Blend per shadow target
    params["evaluate"]["ulira"].update(settings=[setting], splits=4, runs_per_split=2, examples=8)
    monkeypatch.chdir(tmp_path)
    pipeline.split(params, "synthetic")
    pipeline.prepare(params, setting)
    pipeline.retrain(params, setting)
    summary = pipeline.ulira(params, setting)
    written = json.loads((tmp_path / "evaluation" / setting / "ulira.json").read_text())
    assert list(written["runs"]) == ["original", "retrain", "finetune", "finetune+blend"] and written["splits"] == 4 and written["pool"] == 8
    assert written == json.loads(json.dumps(summary))
    assert written["runs"]["finetune"]["runs"] == 8 and written["runs"]["retrain"]["runs"] == min(params["n_models"], 4 * 2)
    arrays = np.load(tmp_path / "evaluation" / setting / "ulira.npz")
    assert arrays["finetune/scores"].shape == (8, 8) and arrays["retrain/member"].shape == (params["n_models"], 8)
    assert len(arrays["pool_ids"]) == 8
    # the report's section: a row per run, the plot and its data (one row per run and example)
    from unlearnops.layout import setting_layout, setting_params
    from unlearnops.report import ulira as report_ulira

    found = report_ulira.load(params, {setting: (setting_params(params, setting), setting_layout(params, setting))})
    shown = report_ulira.table(found)
    assert shown["method"].tolist() == ["original", "retrain", "finetune", "finetune+blend"] and (shown["pool"] == 8).all()
    assert "## synthetic-random-5" in report_ulira.markdown(found, [setting]) and "n_out >= 1000" in report_ulira.markdown(found, [setting])
    png = report_ulira.plot(setting, *found[setting], tmp_path / "plots" / "ulira.png")
    assert png.stat().st_size > 1000
    assert len(report_ulira.plot_data(*found[setting])) == 4 * 8


def test_ulira_stage_deps_follow_its_code(repo_params, tmp_path):
    """dvc.yaml's ulira stage names the code it runs (off by default, so tests/test_dvc_deps.py sees no ulira stage)."""
    import shutil

    import yaml
    from dvc.parsing import DataResolver
    from dvc.repo import Repo

    import test_dvc_deps
    from conftest import REPO

    params = copy.deepcopy(repo_params)
    params["evaluate"]["ulira"]["settings"] = ["digits-random-2"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / ".dvc").mkdir()
    with Repo(str(tmp_path), config={"core": {"no_scm": True}}) as repo:
        stages = DataResolver(repo, str(tmp_path), yaml.safe_load((REPO / "dvc.yaml").read_text())).resolve()["stages"]
    ulira = {name: stage for name, stage in stages.items() if name.startswith("ulira")}
    assert list(ulira) == ["ulira@digits-random-2"]
    assert test_dvc_deps.problems(ulira, params) == []
