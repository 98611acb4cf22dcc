"""A-AMU (the loss transform, the MMD, the method) and Blend condensation (the condenser and
its pipeline stages)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.stats import wasserstein_distance
from sklearn.cluster import KMeans

from conftest import accuracy
from unlearnops.condense import BLENDED_ID, BlendConfig, blend
from unlearnops.config import ConfigError
from unlearnops.methods import get_method
from unlearnops.methods.a_amu import SameClassSampler, gaussian_mmd, loss_transform, soft_cdf
from unlearnops.stack import ModelStack
from unlearnops.training import penultimate_features, predict

# ---------------------------------------------------------------- A-AMU


def test_soft_cdf_stays_inside_zero_one():
    values = torch.tensor([0.0, 1e-3, 5.0, 1e4, 1e9])  # spread enough for the sigmoid to saturate at 1.0
    cdf = soft_cdf(values, sharpness=2.0, margin=1e-6)
    assert (cdf > 0).all() and (cdf < 1).all()
    assert torch.isfinite(loss_transform(values, 2.0, 1e-6, 60.0)).all()


def test_loss_transform_is_monotone_and_clamped():
    losses = torch.sort(torch.rand(50, generator=torch.Generator().manual_seed(0)) * 5).values
    out = loss_transform(losses, sharpness=2.0, cdf_margin=1e-6, clip=60.0)
    assert (out.diff() >= 0).all() and out[-1] > out[0]
    clamped = loss_transform(losses, sharpness=2.0, cdf_margin=1e-6, clip=0.5)
    assert clamped.max() == 0.5 and clamped.min() >= -0.5


def test_mmd_is_zero_for_identical_samples_and_positive_otherwise():
    a = torch.randn(40, generator=torch.Generator().manual_seed(0))
    assert float(gaussian_mmd(a, a.clone(), sigma=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(gaussian_mmd(a, a + 0.5, sigma=1.0)) > 1e-3
    assert float(gaussian_mmd(a, a + 2.0, sigma=1.0)) > float(gaussian_mmd(a, a + 0.5, sigma=1.0))


def test_unseen_samples_share_the_forget_labels():
    val_labels = torch.tensor([2, 0, 2, 1, 0, 2])  # no class 3
    sampler = SameClassSampler(val_labels, num_classes=4)
    torch.manual_seed(0)
    wanted = torch.tensor([0, 1, 2, 2, 0] * 20)
    assert torch.equal(val_labels[sampler(wanted)], wanted)
    assert set(sampler(torch.full((200,), 3)).tolist()) == set(range(6))  # missing class: any validation sample


def forget_val_loss_distance(stack, data, runtime) -> float:
    """Mean over models of the Wasserstein distance between forget and validation CE losses."""
    losses = lambda part: F.cross_entropy(predict(stack, part.x, runtime).transpose(1, 2), part.y.expand(stack.n, -1), reduction="none")  # noqa: E731
    forget, val = losses(data["forget"]), losses(data["val"])
    return float(np.mean([wasserstein_distance(f, v) for f, v in zip(forget.numpy(), val.numpy())]))


def run_a_amu(params, unlearn_data, target, runtime, lam):
    """A-AMU as params.yaml configures it, except for the MMD weight lam."""
    params = copy.deepcopy(params)
    params["methods"]["a_amu"]["lam"] = lam
    return get_method("a_amu", params).unlearn(ModelStack.replicate(target, [2000 + i for i in range(4)]), unlearn_data, runtime)


def test_a_amu_matches_forget_losses_to_unseen_and_keeps_retain(digits_default_setup, one_thread):
    """On the default setting with the default hyperparameters, the forget losses end closer to
    the validation losses than the target's, and than the same steps without the MMD term."""
    params, data, unlearn_data, target, _, runtime = digits_default_setup
    unlearned = run_a_amu(params, unlearn_data, target, runtime, lam=params["methods"]["a_amu"]["lam"])
    retain_only = run_a_amu(params, unlearn_data, target, runtime, lam=0.0)  # the same steps without the MMD term
    distance = {name: forget_val_loss_distance(s, data, runtime) for name, s in [("target", target), ("a_amu", unlearned), ("lam=0", retain_only)]}
    retain = {name: accuracy(s, data["retain"], runtime) for name, s in [("target", target), ("a_amu", unlearned)]}
    print("forget-vs-val loss distance:", distance, "retain acc:", {k: v.tolist() for k, v in retain.items()})
    assert distance["a_amu"] < distance["target"] and distance["a_amu"] < distance["lam=0"]
    assert (retain["a_amu"] >= retain["target"] - 0.05).all()
    again = run_a_amu(params, unlearn_data, target, runtime, lam=params["methods"]["a_amu"]["lam"])
    for name in unlearned.params:
        torch.testing.assert_close(again.params[name], unlearned.params[name], rtol=0, atol=0)


# ---------------------------------------------------------------- Blend


def blend_config(**changes) -> BlendConfig:
    return BlendConfig(**{"ipc": 10, "feature_net": "target", "seed": 0, "kmeans_n_init": 3, "iterations": 12, "lr": 10.0, "momentum": 0.5, **changes})


def test_blend_shrinks_retain_and_keeps_forget_clusters_exactly(tiny_setup):
    _, data, _, target, runtime = tiny_setup
    retain, forget, cfg = data["retain"], data["forget"], blend_config()
    result = blend(retain, forget, target, cfg, runtime)
    condensed = result.retain
    print(f"retain {len(retain)} -> {len(condensed)} ({result.n_kept} kept, {result.n_blended} blended)")
    assert len(condensed) <= len(retain) // 2
    assert len(condensed) == result.n_kept + result.n_blended
    assert set(condensed.y.tolist()) == set(retain.y.tolist())  # no class lost
    assert not set(condensed.ids.tolist()) & set(forget.ids.tolist())  # forget samples never come back

    # The clusters (recomputed here) holding a forget sample keep exactly their retain images.
    x_all, y_all = torch.cat([retain.x, forget.x]), torch.cat([retain.y, forget.y]).numpy()
    features = penultimate_features(target, x_all, runtime)[0].double().numpy()
    expected_kept = set()
    for label in np.unique(retain.y.numpy()):
        rows = np.flatnonzero(y_all == label)
        assignment = KMeans(n_clusters=cfg.ipc, random_state=cfg.seed, n_init=cfg.kmeans_n_init).fit_predict(features[rows])
        for cluster in np.unique(assignment[rows >= len(retain)]):
            expected_kept |= {int(retain.ids[i]) for i in rows[assignment == cluster] if i < len(retain)}
    kept = condensed.ids != BLENDED_ID
    assert set(condensed.ids[kept].tolist()) == expected_kept
    position = {int(i): n for n, i in enumerate(retain.ids)}
    original_rows = torch.tensor([position[int(i)] for i in condensed.ids[kept]])
    assert torch.equal(condensed.x[torch.from_numpy(kept)], retain.x[original_rows])
    assert torch.equal(condensed.y[torch.from_numpy(kept)], retain.y[original_rows])


@pytest.mark.parametrize("feature_net", ["random", "target"])
def test_blended_images_match_their_cluster_embedding_better_than_plain_means(tiny_setup, feature_net):
    """Every SGD step on the blending weights lowers the embedding-matching loss. (In a random
    network's embedding, the authors' choice, the plain mean image already matches its cluster
    closely, so the steps gain little there; in the trained target's they halve it.)"""
    _, data, _, target, runtime = tiny_setup
    plain = blend(data["retain"], data["forget"], target, blend_config(iterations=0, feature_net=feature_net), runtime)
    learned = blend(data["retain"], data["forget"], target, blend_config(feature_net=feature_net), runtime)
    print("embedding-matching loss: plain mean images", plain.match_loss[-1], "-> learned weights", learned.match_loss)
    assert plain.match_loss == [learned.match_loss[0]]  # the learned weights start at 1/n
    assert all(after < before for before, after in zip(learned.match_loss, learned.match_loss[1:]))
    blended = learned.retain.ids == BLENDED_ID
    assert not torch.equal(learned.retain.x[torch.from_numpy(blended)], plain.retain.x[torch.from_numpy(blended)])


def test_blend_is_deterministic(tiny_setup):
    _, data, _, target, runtime = tiny_setup
    first, second = (blend(data["retain"], data["forget"], target, blend_config(), runtime) for _ in range(2))
    assert torch.equal(first.retain.x, second.retain.x) and np.array_equal(first.retain.ids, second.retain.ids)


def test_blend_that_would_empty_a_class_is_an_error(tiny_setup):
    _, data, _, target, runtime = tiny_setup
    with pytest.raises(ConfigError, match="ipc is 0.*left empty"):
        blend(data["retain"], data["forget"], target, blend_config(ipc=0), runtime)


# ---------------------------------------------------------------- the pipeline stages


@pytest.mark.slow
def test_blend_stages_write_condensed_runs_and_report_them(tiny_params, tmp_path, monkeypatch):
    from unlearnops import layout, pipeline
    from unlearnops.data import load_prepared
    from unlearnops.stages import run_stage

    params = copy.deepcopy(tiny_params)
    params["n_models"] = 4  # the report's retrain noise floor needs 2 models per half
    params["unlearn"]["methods"] = ["finetune"]
    params["condense"]["methods"] = ["finetune"]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    monkeypatch.setenv("UNLEARNOPS_PARAMS", str(params_file))
    monkeypatch.chdir(tmp_path)
    pipeline.prepare(params)
    pipeline.train_target(params)
    pipeline.retrain(params)
    pipeline.evaluate_retrain(params)  # retrain's MIA and relearning attack: every evaluate stage's reference
    pipeline.unlearn(params, "finetune")
    pipeline.evaluate(params, "finetune")
    run_stage("unlearn", ["finetune", "--condense", "blend"])  # what dvc.yaml's unlearn_blend runs
    run_stage("evaluate", ["finetune", "--condense", "blend"])
    pipeline.report(params)

    metrics = json.loads((tmp_path / "metrics/methods/finetune+blend.json").read_text())
    sizes = metrics["condense"]
    print("retain-set sizes:", sizes)
    assert sizes["retain_before"] == len(load_prepared(layout.PREPARED)["retain"])
    assert sizes["retain_after"] == sizes["kept"] + sizes["blended"] <= sizes["retain_before"] // 2
    assert metrics["method"] == "finetune+blend" and metrics["n_models"] == 4
    assert (tmp_path / "models/unlearned/finetune+blend/models.pt").is_file()
    assert "finetune+blend" in (tmp_path / "reports/table.md").read_text()
    relearn = json.loads((tmp_path / "metrics/relearn/finetune+blend.json").read_text())  # evaluate ran the attack
    assert relearn["name"] == "finetune+blend" and "retrain" in relearn["subsets"]["F1"]
    assert "finetune+blend" in (tmp_path / "reports/relearn.md").read_text()


def test_unknown_condenser_is_a_clear_error(tiny_params, tmp_path, monkeypatch, capsys):
    from unlearnops.stages import run_stage

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params))
    monkeypatch.setenv("UNLEARNOPS_PARAMS", str(params_file))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_stage("unlearn", ["finetune", "--condense", "shrink"])
    assert exit_info.value.code == 2
    assert "unknown condenser 'shrink'; allowed: blend" in capsys.readouterr().err
