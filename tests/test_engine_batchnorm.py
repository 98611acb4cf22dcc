"""The CPU grouped path for BatchNorm ResNets (the default small_resnet): N models as one network
in the [B, N*C, H, W] layout must be exactly N separate models, in training and evaluation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torchvision.models.resnet import BasicBlock

from unlearnops.data import load_synthetic_source
from unlearnops.methods.weight_surgery import conv_weight_names, transpose_conv_kernels
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, GroupedCNN, Runtime, Stream, _BatchedStep, cross_entropy_on, fit, penultimate_features, predict, train_from_scratch

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = Runtime("cpu", models_per_pass=8)


@pytest.fixture(scope="module")
def spec(repo_params) -> dict:
    """params.yaml's small_resnet (its widths) on 8x8 single-channel images of 4 classes."""
    return {"arch": "small_resnet", "num_classes": 4, "in_channels": 1, "image_size": 8, "options": dict(repo_params["model"]["small_resnet"])}


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """300 normalised 8x8 images of 4 classes (a partial last batch at batch size 64)."""
    source = load_synthetic_source({"synthetic": dict(n_samples=300, n_classes=4, image_size=8, channels=1, noise=0.35, seed=0)})
    x = source.images.float() / 255
    return (x - x.mean()) / x.std(), source.labels


def train_fit(repo_params, epochs: int | None = None) -> FitConfig:
    """params.yaml's train.fit (SGD, momentum, weight decay, cosine), optionally fewer epochs."""
    fit_params = dict(repo_params["train"]["fit"])
    return FitConfig(**{**fit_params, "epochs": epochs or fit_params["epochs"]})


def test_small_resnet_runs_grouped_and_anything_else_falls_back(spec):
    assert _BatchedStep(spec, cross_entropy_on("x"), CPU).grouped is not None
    block = lambda **kw: BasicBlock(4, 4, **kw)  # noqa: E731
    assert GroupedCNN.supports(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), block(), nn.Flatten()))
    not_supported = {
        "cumulative-average BatchNorm": nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=None)),
        "BatchNorm without affine": nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False)),
        "BatchNorm without running stats": nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
        "a BasicBlock subclass": nn.Sequential(type("MyBlock", (BasicBlock,), {})(4, 4)),
        "a downsample with a ReLU": nn.Sequential(BasicBlock(4, 8, 2, nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.ReLU()))),
        "BatchNorm1d": nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4)),
        "a plain module": BasicBlock(4, 4),
    }
    for what, module in not_supported.items():
        assert not GroupedCNN.supports(module), what


def one_training_step(spec, n: int, train_mode: bool):
    """The engine's batched loss (grouped, inside vmap) and N functional_calls of the module on
    copies of the same stacked weights and buffers: losses, gradients and buffers of both."""
    stack = ModelStack.fresh(spec, list(range(n)))
    gen = torch.Generator().manual_seed(1)
    x, y, shared = torch.randn(n, 16, 1, 8, 8, generator=gen), torch.randint(0, 4, (n, 16), generator=gen), torch.randn(5, 1, 8, 8, generator=gen)

    def loss_fn(forward, batches):  # two forwards on the model's batch (a derived one) and one on a tensor shared by all models
        xb, yb = batches["train"]
        return F.cross_entropy(forward(xb), yb) + forward(2 * xb).square().mean() + forward(shared).mean()

    step = _BatchedStep(spec, loss_fn, CPU)
    step.base.train(train_mode)
    params = {k: v.clone().requires_grad_(True) for k, v in stack.params.items()}
    buffers = {k: v.clone() for k, v in stack.buffers.items()}
    losses = step(params, buffers, {"train": (x, y)}, True)
    grads = torch.autograd.grad(losses.sum(), list(params.values()))
    engine = (losses.detach(), dict(zip(params, grads)), buffers)

    separate_losses, separate_grads, separate_buffers = [], [], []
    module = copy.deepcopy(step.base)
    for i in range(n):
        p = {k: v[i].clone().requires_grad_(True) for k, v in stack.params.items()}
        b = {k: v[i].clone() for k, v in stack.buffers.items()}
        loss = loss_fn(lambda v: functional_call(module, (p, b), (v,)), {"train": (x[i], y[i])})
        separate_losses.append(loss.detach())
        separate_grads.append(dict(zip(p, torch.autograd.grad(loss, list(p.values())))))
        separate_buffers.append(b)
    separate = (torch.stack(separate_losses), {k: torch.stack([g[k] for g in separate_grads]) for k in params},
                {k: torch.stack([b[k] for b in separate_buffers]) for k in buffers})
    return engine, separate, stack


@pytest.mark.parametrize("train_mode", [True, False])
def test_grouped_batchnorm_equals_separate_models(spec, train_mode):
    """Losses, gradients and BatchNorm buffers (running mean, var, num_batches_tracked) after one
    training step equal N functional_calls; in eval mode the buffers are used, not changed."""
    (loss_e, grads_e, buffers_e), (loss_s, grads_s, buffers_s), start = one_training_step(spec, 3, train_mode)
    torch.testing.assert_close(loss_e, loss_s, rtol=1e-5, atol=1e-5)
    for k in grads_s:
        torch.testing.assert_close(grads_e[k], grads_s[k], rtol=1e-4, atol=1e-5)
    assert any(k.endswith("downsample.1.running_var") for k in buffers_e)  # the residual shortcuts' BatchNorm too
    for k in buffers_s:
        torch.testing.assert_close(buffers_e[k], buffers_s[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(buffers_e[k], start.buffers[k]) != train_mode, k  # trained: every buffer moved; eval: none did
    tracked = [k for k in buffers_e if k.endswith("num_batches_tracked")]
    assert all((buffers_e[k] == (3 if train_mode else 0)).all() for k in tracked)  # three forwards per model


def test_small_resnet_trains_the_same_alone_or_among_others(spec, data, repo_params):
    """params.yaml's train.fit, 3 epochs: 3 models together (grouped), in passes of 2 + 1, and
    each alone (the plain module) agree on weights and BatchNorm buffers."""
    x, y = data
    stream, cfg, seeds = Stream(x, y, batch_size=repo_params["train"]["fit"]["batch_size"]), train_fit(repo_params, 3), [11, 12, 13]
    together, _ = train_from_scratch(spec, seeds, stream, cfg, CPU, "together")
    in_passes, _ = train_from_scratch(spec, seeds, stream, cfg, Runtime("cpu", models_per_pass=2), "passes")
    alone = ModelStack.concat([train_from_scratch(spec, [seed], stream, cfg, CPU, "alone")[0] for seed in seeds])
    for other in (in_passes, alone):
        for k in together.params:
            torch.testing.assert_close(together.params[k], other.params[k], rtol=1e-3, atol=1e-4)
        for k in together.buffers:
            torch.testing.assert_close(together.buffers[k], other.buffers[k], rtol=1e-3, atol=1e-4)
    assert (together.buffers["1.num_batches_tracked"] == 3 * 5).all()  # 3 epochs of 5 batches
    # Trained, and each model its own: the loss fell, and the models differ.
    logits = predict(together, x, CPU)
    start_logits = predict(ModelStack.fresh(spec, seeds), x, CPU)
    loss = lambda z: torch.stack([F.cross_entropy(row, y) for row in z])  # noqa: E731
    assert (loss(logits) < 0.8 * loss(start_logits)).all()
    assert not torch.allclose(together.buffers["1.running_mean"][0], together.buffers["1.running_mean"][1])


def test_predict_and_features_use_running_statistics_per_model(spec, data, repo_params):
    """predict and penultimate_features (grouped, eval mode) equal each model's own nn.Module
    in eval mode, whose BatchNorm uses its running statistics."""
    x, y = data
    stack = fit(ModelStack.fresh(spec, [1, 2]), {"train": Stream(x, y, 64)}, cross_entropy_on("train"), train_fit(repo_params, 1), CPU, driver="train")
    logits, features = predict(stack, x, CPU), penultimate_features(stack, x, CPU)
    for i in range(2):
        module = stack.module(i)
        torch.testing.assert_close(logits[i], module(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(features[i], module[:-1](x), rtol=1e-4, atol=1e-5)
    train_mode_logits = stack.module(0).train()(x)
    assert not torch.allclose(logits[0], train_mode_logits, atol=1e-3)  # batch statistics would give other logits


def test_small_resnet_checkpoint_keeps_buffers(spec, data, tmp_path, repo_params):
    x, y = data
    stack = fit(ModelStack.fresh(spec, [4, 5]), {"train": Stream(x, y, 64)}, cross_entropy_on("train"), train_fit(repo_params, 1), CPU, driver="train")
    stack.save(tmp_path / "models.pt")
    loaded = ModelStack.load(tmp_path / "models.pt")
    assert loaded.seeds == [4, 5] and set(loaded.buffers) == set(stack.buffers) and set(loaded.params) == set(stack.params)
    for k in stack.buffers:
        assert torch.equal(loaded.buffers[k], stack.buffers[k]) and loaded.buffers[k].dtype == stack.buffers[k].dtype
    assert (loaded.buffers["1.num_batches_tracked"] == 5).all()
    torch.testing.assert_close(predict(loaded, x, CPU), predict(stack, x, CPU))


def test_weight_surgery_finds_every_conv_of_small_resnet(spec):
    """The methods' conv helpers see the stem, both convs of every block and the 1x1 shortcuts."""
    names = conv_weight_names(spec, "test")
    model = ModelStack.fresh(spec, [0]).module(0)
    assert names == [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(names) == 1 + 2 * len(spec["options"]["widths"]) + (len(spec["options"]["widths"]) - 1)
    stack = ModelStack.fresh(spec, [0, 1])
    transposed = transpose_conv_kernels(stack, names)  # 1x1 shortcut kernels are square too
    assert all(torch.equal(transposed.params[k], stack.params[k].transpose(-1, -2)) for k in names)
