"""MUSO: the exact linear form, its network form, and the engine pieces it needs
(random-features architecture, penultimate features, per-model labels)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import accuracy, make_setup, tiny
from unlearnops.methods import get_method
from unlearnops.methods.muso import (
    forget_targets,
    gradient_descent,
    head_matrix,
    muso_relabel,
    parameter_gap,
    project,
    with_ones,
)
from unlearnops.nets import RandomFeatures, build_model, model_spec, without_head
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, Runtime, Stream, cross_entropy_on, fit, penultimate_features, predict

# ---------------------------------------------------------------- the linear form


def linear_problem(n_outputs: int | None):
    """The acceptance setting: D=400 random Fourier features (the random_features architecture's
    feature map), 100 retain + 10 forget samples, fixed seed. n_outputs None: regression
    targets; else one-hot labels of that many classes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(110, 10, generator=gen)
    body, _ = without_head(RandomFeatures(10, 1, features=400, lengthscale=0.5, seed=0))
    z = body(x).double()
    if n_outputs is None:
        y = torch.sin(x[:, 0]).double() + 0.1 * torch.randn(110, generator=gen, dtype=torch.float64)
        w0 = torch.randn(400, generator=gen, dtype=torch.float64) / 20
        wrong = torch.randn(10, generator=gen, dtype=torch.float64)
    else:
        labels = torch.randint(0, n_outputs, (110,), generator=gen)
        y = torch.nn.functional.one_hot(labels, n_outputs).double()
        w0 = torch.randn(400, n_outputs, generator=gen, dtype=torch.float64) / 20
        wrong = torch.nn.functional.one_hot((labels[100:] + 1) % n_outputs, n_outputs).double()
    return z[:100], y[:100], z[100:], y[100:], w0, wrong




@pytest.mark.parametrize("n_outputs", [None, 3], ids=["regression", "one-hot"])
def test_linear_muso_reaches_the_retrained_parameters(n_outputs, one_thread):
    z_r, y_r, z_f, y_f, w0, random_forget_labels = linear_problem(n_outputs)
    z, lr, steps = torch.cat([z_r, z_f]), 1 / float(torch.linalg.eigvalsh(z_r.T @ z_r / 100)[-1]), 2000
    w_original = gradient_descent(z, torch.cat([y_r, y_f]), w0, lr, steps)
    w_retrained = gradient_descent(z_r, y_r, w0, lr, steps)  # the minimum-norm (from w0) retain fit
    y_u = muso_relabel(z_r, y_r, z_f, w0, eps=1e-8)
    gaps = {
        "muso": parameter_gap(w_retrained, gradient_descent(z, torch.cat([y_r, y_u]), w_original, lr, steps)),
        "finetune": parameter_gap(w_retrained, gradient_descent(z_r, y_r, w_original, lr, steps)),
        "random_label": parameter_gap(w_retrained, gradient_descent(z, torch.cat([y_r, random_forget_labels]), w_original, lr, steps)),
    }
    print(gaps)
    assert gaps["finetune"] > 1e-4 and gaps["random_label"] > 1e-4  # the baselines really miss
    assert gaps["muso"] < 1e-6 * min(gaps["finetune"], gaps["random_label"])


def test_relabel_is_the_retrained_models_prediction():
    z_r, y_r, z_f, _, w0, _ = linear_problem(None)
    w_retrained = w0 + torch.linalg.pinv(z_r) @ (y_r - z_r @ w0)  # closed form of GD from w0 on retain
    torch.testing.assert_close(muso_relabel(z_r, y_r, z_f, w0, eps=1e-8), z_f @ w_retrained, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows", [5, 30], ids=["rows<features", "rows>features"])
def test_projector_equals_its_definition_on_both_sides(rows):
    gen = torch.Generator().manual_seed(1)
    z, v = torch.randn(2, rows, 12, generator=gen, dtype=torch.float64), torch.randn(2, 12, 3, generator=gen, dtype=torch.float64)
    eps = 1e-3
    explicit = z.mT @ torch.linalg.inv(z @ z.mT + eps * torch.eye(rows, dtype=z.dtype)) @ z @ v
    torch.testing.assert_close(project(z, v, eps), explicit)


def test_network_targets_before_training_are_the_linear_relabel():
    """With phi_current = phi_original, R's extra w_p cancels: the targets are the argmax of
    the linear form's relabel y_u, with y_r = Z_r w_p (what the original predicts on retain)."""
    gen = torch.Generator().manual_seed(2)
    z_r, phi = with_ones(torch.randn(1, 20, 30, generator=gen)), with_ones(torch.randn(1, 6, 30, generator=gen))
    w0, w_p = torch.randn(1, 31, 4, generator=gen), torch.randn(1, 31, 4, generator=gen)
    expected = muso_relabel(z_r[0].double(), (z_r[0] @ w_p[0]).double(), phi[0].double(), w0[0].double(), eps=1e-6).argmax(-1)
    torch.testing.assert_close(forget_targets(phi, phi, z_r, w0, w_p, eps=1e-6)[0], expected)


# ---------------------------------------------------------------- engine pieces


def test_random_features_share_a_fixed_feature_map(tiny_setup):
    params, data, _, _, runtime = tiny_setup
    params = copy.deepcopy(params)
    params["model"].update(arch="random_features", random_features={"features": 64, "lengthscale": 1.0, "seed": 3})
    spec = model_spec(params, data.num_classes, data.in_channels, data.image_size)
    a, b = build_model(spec, seed=0), build_model(spec, seed=1)
    assert [name for name, _ in a.named_parameters()] == ["head.weight", "head.bias"]  # features are not trained
    torch.testing.assert_close(a.projection, b.projection)  # one map for every model of the pipeline
    assert not torch.equal(a.head.weight, b.head.weight)
    stack = ModelStack.fresh(spec, [0, 1])
    cfg = FitConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant")
    trained = fit(stack, {"train": Stream(data["train"].x, data["train"].y, 32)}, cross_entropy_on("train"), cfg, runtime, driver="train")
    torch.testing.assert_close(trained.buffers["projection"], stack.buffers["projection"])
    assert not torch.equal(trained.params["head.weight"], stack.params["head.weight"])


def test_penultimate_features_on_per_model_rows(tiny_setup):
    _, data, _, target, runtime = tiny_setup
    stack = ModelStack.concat([target, ModelStack.fresh(target.spec, [5])])
    rows = torch.tensor([[3, 1], [0, 7]])  # model i sees x[rows[i]]
    per_model = penultimate_features(stack, data["val"].x, runtime, rows)
    full = penultimate_features(stack, data["val"].x, runtime)
    torch.testing.assert_close(per_model, torch.stack([full[0, rows[0]], full[1, rows[1]]]))


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "random_features"])
def test_every_architecture_splits_into_features_and_head(arch):
    options = {"small_cnn": {"width": 4}, "resnet18": {"small_input_stem": True}, "random_features": {"features": 32, "lengthscale": 1.0, "seed": 0}}
    spec = {"arch": arch, "num_classes": 3, "in_channels": 1, "image_size": 8, "options": options[arch]}
    stack, x = ModelStack.fresh(spec, [0, 1]), torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    logits = with_ones(penultimate_features(stack, x, Runtime())) @ head_matrix(stack)
    torch.testing.assert_close(logits, predict(stack, x, Runtime()), atol=1e-4, rtol=1e-4)


def test_per_model_labels_train_each_model_on_its_own_labels(tiny_setup):
    _, data, _, target, runtime = tiny_setup
    stack = ModelStack.replicate(target, [0, 1])
    n = len(data["forget"])
    labels = torch.stack([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])  # model i: class i
    cfg = FitConfig(epochs=8, batch_size=8, optimizer="adam", lr=0.05, momentum=0.0, weight_decay=0.0, schedule="constant")
    runtime_one_per_pass = Runtime(runtime.device, 1, runtime.eval_batch_size, runtime.bf16)  # per-model labels across chunks
    trained = fit(stack, {"f": Stream(data["forget"].x, labels, 8)}, cross_entropy_on("f"), cfg, runtime_one_per_pass, driver="f")
    predicted = predict(trained, data["forget"].x, runtime).argmax(-1)
    assert (predicted[0] == 0).all() and (predicted[1] == 1).all()


# ---------------------------------------------------------------- the network form


@pytest.fixture(scope="module")
def noisy_random_features_setup(repo_params, tmp_path_factory):
    """A random-features target on harder synthetic data, so the retrained head disagrees with
    the true labels on some forget samples (on the easy data it predicts them all correctly)."""
    params = tiny(repo_params)
    params["data"]["synthetic"]["noise"] = 1.0
    params["model"].update(arch="random_features", random_features={"features": 256, "lengthscale": 1.0, "seed": 0})
    return make_setup(params, tmp_path_factory.mktemp("noisy"))


def run_muso(params, unlearn_data, target, runtime, lr=1e-3, n_runs=4):
    params = copy.deepcopy(params)
    params["methods"]["muso"]["fit"].update(batch_size=32, lr=lr)
    method = get_method("muso", params)
    return method, method.unlearn(ModelStack.replicate(target, [2000 + i for i in range(n_runs)]), unlearn_data, runtime)


def test_muso_relabels_forget_and_keeps_retain(noisy_random_features_setup):
    params, data, unlearn_data, target, runtime = noisy_random_features_setup
    method, unlearned = run_muso(params, unlearn_data, target, runtime)
    assert len(method.forget_labels) == params["methods"]["muso"]["fit"]["epochs"]
    labels = method.forget_labels[0]
    assert labels.shape == (4, len(data["forget"]))
    differ = (labels != data["forget"].y).float().mean(1)
    print("fraction of forget labels changed per run:", differ.tolist())
    assert (differ > 0).all() and (differ < 1).all()
    retain_before, retain_after = accuracy(target, data["retain"], runtime), accuracy(unlearned, data["retain"], runtime)
    print("retain acc", retain_before.tolist(), "->", retain_after.tolist())
    assert (retain_after >= retain_before - 0.05).all()


def test_muso_pulls_forget_outputs_to_its_labels(noisy_random_features_setup):
    """With params.yaml's muso settings, every run's cross-entropy against MUSO's forget labels
    (those of its last epoch) falls below the target's."""
    params, data, unlearn_data, target, runtime = noisy_random_features_setup
    method = get_method("muso", params)
    unlearned = method.unlearn(ModelStack.replicate(target, [2000 + i for i in range(4)]), unlearn_data, runtime)
    labels = method.forget_labels[-1]
    to_labels = lambda stack: F.cross_entropy(predict(stack, data["forget"].x, runtime).expand(4, -1, -1).transpose(1, 2), labels, reduction="none").mean(1)  # noqa: E731
    print("cross-entropy to MUSO's forget labels:", to_labels(target).tolist(), "->", to_labels(unlearned).tolist())
    assert (to_labels(unlearned) < to_labels(target)).all()


def test_muso_runs_on_the_small_cnn_and_is_deterministic(tiny_setup):
    params, data, unlearn_data, target, runtime = tiny_setup
    _, first = run_muso(params, unlearn_data, target, runtime, n_runs=2)
    _, second = run_muso(params, unlearn_data, target, runtime, n_runs=2)
    for name in first.params:
        torch.testing.assert_close(first.params[name], second.params[name], rtol=0, atol=0)
    assert (accuracy(first, data["retain"], runtime) >= accuracy(target, data["retain"], runtime) - 0.05).all()


def test_bad_keep_ratio_is_a_clear_error(tiny_setup):
    from unlearnops.config import ConfigError

    params, _, unlearn_data, target, runtime = tiny_setup
    params = copy.deepcopy(params)
    params["methods"]["muso"]["keep_ratio"] = 1.5
    with pytest.raises(ConfigError, match=r"keep_ratio must be in \(0, 1\], got 1.5"):
        get_method("muso", params).unlearn(ModelStack.replicate(target, [0]), unlearn_data, runtime)
