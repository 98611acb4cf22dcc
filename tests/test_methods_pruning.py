"""The weight-surgery methods: prune_reinit, conv_transpose, conv_transpose_pseudo, salun.

Each method's defining step is checked on its own against the authors' rule (the pruned set
against torch.nn.utils.prune over weights and biases, the fan-in re-initialisation and float16
rounding of xcadet/deepunlearn kgltop4.py, the exact kernel transposition of kgltop5.py, the
pseudo-labelled subset, SalUn's masked update), plus determinism, configuration errors, architectures without
convolutions and ResNet-18. The whole runs with params.yaml's defaults are in
test_methods_defaults_competition.py and (SalUn) test_methods_defaults_others.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from unlearnops import methods, nets
from unlearnops.config import ConfigError
from unlearnops.data import Part
from unlearnops.methods import UnlearnData
from unlearnops.methods.prune_reinit import entropy_matching_loss
from unlearnops.methods.weight_surgery import layer_weight_names
from unlearnops.stack import ModelStack
from unlearnops.training import Runtime, predict

METHODS = ["prune_reinit", "conv_transpose", "conv_transpose_pseudo", "salun"]
SEEDS = [2000, 2001, 2002, 2003]


def configured(params: dict, name: str, **changes) -> methods.Unlearner:
    """The method `name` with some hyperparameters changed; a dict value updates a nested block."""
    params = copy.deepcopy(params)
    hp = params["methods"][name]
    for key, value in changes.items():
        hp[key] = {**hp[key], **value} if isinstance(value, dict) else value
    return methods.get_method(name, params)


def fit_blocks(params: dict, name: str) -> list[str]:
    return [key for key, value in params["methods"][name].items() if isinstance(value, dict)]


# ------------------------------------------------------------------ the defining steps


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_prune_reinit_reinitialises_exactly_the_l1_pruned_fraction(tiny_setup, scope):
    params, _, unlearn_data, target, runtime = tiny_setup
    method = configured(params, "prune_reinit", prune_scope=scope, round_to_half=False, fit={"epochs": 0})  # the surgery alone
    start = ModelStack.replicate(target, SEEDS)
    pruned = method.unlearn(start, unlearn_data, runtime)

    # torch's own pruning of the original, over the weights AND biases of every conv and linear
    # layer (kgltop4.py's prune_model), decides which values must be gone
    reference = target.module(0)
    tensors = [(m, kind) for m in reference.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for kind in ("weight", "bias") if getattr(m, kind) is not None]
    fraction = params["methods"]["prune_reinit"]["prune_fraction"]
    if scope == "per_tensor":
        for module, kind in tensors:
            prune.l1_unstructured(module, kind, amount=fraction)
    else:
        prune.global_unstructured(tensors, pruning_method=prune.L1Unstructured, amount=fraction)
    expected = {f"{name}.{kind}": getattr(module, f"{kind}_mask") == 0 for name, module in reference.named_modules() for kind in ("weight", "bias") if hasattr(module, f"{kind}_mask")}
    assert any(name.endswith(".bias") for name in expected)

    total = sum(mask.numel() for mask in expected.values())
    changed_total = torch.zeros(len(SEEDS), dtype=torch.long)
    for name, value in start.params.items():
        changed = pruned.params[name] != value
        if name not in expected:
            assert not changed.any(), f"{name} is not a pruned tensor but changed"
            continue
        changed_total += changed.flatten(1).sum(1)
        for i in range(len(SEEDS)):
            assert torch.equal(changed[i], expected[name]), f"{name}: run {i} re-initialised other values than L1 pruning picks"
        new = pruned.params[name][changed]
        if name.endswith(".bias"):
            assert (new == 0).all(), f"{name}: pruned biases stay 0"
        else:  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_channels x kernel size
            bound = value[0, 0].numel() ** -0.5
            assert float(new.abs().max()) <= bound, name
            if new.numel() >= 1000:
                assert abs(float(new.std()) / (bound / 3**0.5) - 1) < 0.1, name
        if scope == "per_tensor":
            assert (changed.flatten(1).sum(1) == round(fraction * value[0].numel())).all()
    if scope == "global":
        assert (changed_total == round(fraction * total)).all()
    first_conv = layer_weight_names(target.spec, ["conv"], "test")[0]
    assert not torch.equal(pruned.params[first_conv][0], pruned.params[first_conv][1])  # per-run random values


def test_prune_reinit_rounds_the_weights_to_half_precision(tiny_setup):
    params, _, unlearn_data, target, runtime = tiny_setup
    start = ModelStack.replicate(target, SEEDS[:2])
    rounded = configured(params, "prune_reinit", fit={"epochs": 0}).unlearn(start, unlearn_data, runtime)
    exact = configured(params, "prune_reinit", round_to_half=False, fit={"epochs": 0}).unlearn(start, unlearn_data, runtime)
    for name, value in {**exact.params, **exact.buffers}.items():
        got = {**rounded.params, **rounded.buffers}[name]
        assert torch.equal(got, value.half().to(value.dtype) if value.is_floating_point() else value), name
    assert any(not torch.equal(rounded.params[k], exact.params[k]) for k in exact.params)


def test_prune_reinit_loss_is_the_authors_entropy_loss(tiny_setup):
    """kgltop4.py's entropy_loss_fn with class weights count^-0.1, written out."""
    params, data, unlearn_data, _, _ = tiny_setup
    method = configured(params, "prune_reinit")
    y = data["retain"].y
    weights = method.class_weights(y, unlearn_data.num_classes)
    counts = torch.bincount(y, minlength=unlearn_data.num_classes).float()
    assert torch.allclose(weights, counts**-0.1)
    gen = torch.Generator().manual_seed(0)
    logits, original = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    batch = y[:8]
    ce = -(weights[batch] * logits.log_softmax(-1)[torch.arange(8), batch]).sum() / weights[batch].sum()
    log_t = original.log_softmax(-1)
    entropy_target = (-log_t.exp() * log_t).sum(1)
    entropy_model = (-logits.softmax(-1) * logits.log_softmax(-1)).sum(1)
    expected = ce + method.hp.entropy_weight * ((entropy_model - entropy_target) ** 2).mean()
    assert torch.allclose(entropy_matching_loss(logits, batch, original, weights, method.hp.entropy_weight), expected)


def assert_kernels_transposed(original: ModelStack, transposed: ModelStack):
    convs = layer_weight_names(original.spec, ["conv"], "test")
    assert convs
    for name, weight in original.params.items():
        if name in convs:
            assert torch.equal(transposed.params[name], weight.transpose(-1, -2))
            if weight.shape[-1] > 1:  # trained kernels are not symmetric (1x1 shortcut kernels are)
                assert not torch.equal(transposed.params[name], weight)
        else:
            assert torch.equal(transposed.params[name], weight)


def test_conv_transpose_transposes_every_kernel_before_finetuning(tiny_setup):
    params, _, unlearn_data, target, runtime = tiny_setup
    start = ModelStack.replicate(target, SEEDS)
    surgery_only = configured(params, "conv_transpose", fit={"epochs": 0}).unlearn(start, unlearn_data, runtime)
    assert_kernels_transposed(start, surgery_only)
    # the pseudo-label variant's quick model starts from the same transposition (run 0's copy)
    pseudo = configured(params, "conv_transpose_pseudo", quick_fit={"epochs": 0})
    quick = pseudo.quickly_unlearned(start, unlearn_data, runtime)
    assert quick.seeds == SEEDS[:1]
    assert_kernels_transposed(start.select([0]), quick)


@pytest.mark.parametrize("score, source", [("prob_drop", "quick"), ("kl", "original_runner_up")])
def test_pseudo_labels_go_to_the_forget_samples_that_changed_most(tiny_setup, score, source):
    params, data, unlearn_data, target, runtime = tiny_setup
    method = configured(params, "conv_transpose_pseudo", change_score=score, pseudo_label=source, pseudo_fraction=0.5)
    start = ModelStack.replicate(target, SEEDS)
    quick = method.quickly_unlearned(start, unlearn_data, runtime)
    chosen, labels = method.pseudo_labelled(start, quick, data["forget"], runtime)

    n_forget = len(data["forget"])
    assert len(chosen) == len(labels) == round(0.5 * n_forget) and len(set(chosen.tolist())) == len(chosen)
    p = predict(target, data["forget"].x, runtime)[0].softmax(-1)
    q = predict(quick, data["forget"].x, runtime)[0].softmax(-1)
    if score == "kl":
        change = F.kl_div(q.log(), p, reduction="none").sum(-1)
    else:
        top = p.argmax(-1)
        change = p.max(-1).values - q[torch.arange(n_forget), top]
    rest = torch.ones(n_forget, dtype=torch.bool)
    rest[chosen] = False
    assert change[chosen].min() >= change[rest].max() - 1e-6
    expected = q.argmax(-1) if source == "quick" else p.topk(2, dim=-1).indices[:, 1]
    assert torch.equal(labels, expected[chosen])


def test_salun_trains_only_the_salient_weights(tiny_setup):
    params, data, unlearn_data, target, runtime = tiny_setup
    method = configured(params, "salun", fit={"weight_decay": 0.0})  # without decay, unmasked weights stay exact
    start = ModelStack.replicate(target, SEEDS)
    masks = method.saliency_masks(start, data["forget"], runtime)

    model = target.module(0)
    loss = F.cross_entropy(model(data["forget"].x), data["forget"].y)
    saliency = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    fraction = params["methods"]["salun"]["saliency_fraction"]
    total = sum(g.numel() for g in saliency.values())
    assert sum(int(m[0].sum()) for m in masks.values()) == round(fraction * total)
    salient = torch.cat([saliency[k].abs().flatten()[m[0].flatten()] for k, m in masks.items()])
    other = torch.cat([saliency[k].abs().flatten()[~m[0].flatten()] for k, m in masks.items()])
    assert salient.min() >= other.max() * (1 - 1e-5)  # the mask holds the largest |grad| (global scope; float slack)
    assert all(torch.equal(m, m[:1].expand_as(m)) for m in masks.values())  # one original, one mask

    unlearned = method.unlearn(start, unlearn_data, runtime)
    changed = {k: unlearned.params[k] != start.params[k] for k in start.params}
    assert not any((changed[k] & ~masks[k]).any() for k in masks)
    moved = sum(int((changed[k] & masks[k]).sum()) for k in masks) / sum(int(masks[k].sum()) for k in masks)
    assert moved > 0.9


# ------------------------------------------------------------------ the whole method

# SalUn's whole run with params.yaml's defaults, on the default setting: test_methods_defaults_others.py.


@pytest.mark.parametrize("name", METHODS)
def test_same_seeds_give_identical_models(name, tiny_setup):
    params, _, unlearn_data, target, runtime = tiny_setup
    method = methods.get_method(name, params)
    a = method.unlearn(ModelStack.replicate(target, [5, 6]), unlearn_data, runtime)
    b = method.unlearn(ModelStack.replicate(target, [5, 6]), unlearn_data, runtime)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    first_conv = layer_weight_names(target.spec, ["conv"], "test")[0]
    assert not torch.equal(a.params[first_conv][0], a.params[first_conv][1])  # runs differ by seed


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", METHODS)
def test_missing_or_unknown_hyperparameters_are_named(name, tiny_params):
    hp = tiny_params["methods"][name]
    first = next(iter(hp))
    with pytest.raises(ConfigError, match=rf"methods.{name}: unknown key\(s\) \['bogus'\]"):
        methods.get_method(name, {**tiny_params, "methods": {name: {**hp, "bogus": 1}}})
    with pytest.raises(ConfigError, match=rf"methods.{name}: missing key\(s\) \['{first}'\]"):
        methods.get_method(name, {**tiny_params, "methods": {name: {k: v for k, v in hp.items() if k != first}}})
    block = fit_blocks(tiny_params, name)[-1]
    with pytest.raises(ConfigError, match=rf"methods.{name}.{block}: missing key\(s\) \['epochs'\]"):
        methods.get_method(name, {**tiny_params, "methods": {name: {**hp, block: {k: v for k, v in hp[block].items() if k != "epochs"}}}})


@pytest.mark.parametrize(
    "name, key, value, message",
    [
        ("prune_reinit", "prune_scope", "layer", "unknown methods.prune_reinit.prune_scope 'layer'; allowed: per_tensor, global"),
        ("prune_reinit", "prune_layers", ["conv", "attention"], "unknown methods.prune_reinit.prune_layers entry 'attention'; allowed: conv, linear"),
        ("prune_reinit", "prune_fraction", 1.5, r"prune_fraction must be a number in \[0, 1\], got 1.5"),
        ("prune_reinit", "retain_fraction", 0, r"retain_fraction must be a number in \(0, 1\], got 0"),
        ("conv_transpose", "retain_fraction", 2, r"retain_fraction must be a number in \(0, 1\], got 2"),
        ("conv_transpose_pseudo", "change_score", "l2", "unknown methods.conv_transpose_pseudo.change_score 'l2'; allowed: prob_drop, kl"),
        ("conv_transpose_pseudo", "pseudo_label", "true", "unknown methods.conv_transpose_pseudo.pseudo_label 'true'"),
        ("conv_transpose_pseudo", "pseudo_fraction", 0, r"pseudo_fraction must lie in \(0, 1\], got 0"),
        ("salun", "saliency_scope", "layer", "unknown methods.salun.saliency_scope 'layer'; allowed: per_tensor, global"),
    ],
)
def test_bad_hyperparameter_values_are_named(tiny_params, name, key, value, message):
    tiny_params["methods"][name][key] = value
    with pytest.raises(ConfigError, match=message):
        methods.get_method(name, tiny_params)


def test_methods_that_need_convolutions_refuse_an_architecture_without(tiny_setup, monkeypatch):
    params, _, unlearn_data, target, runtime = tiny_setup
    monkeypatch.setitem(nets.ARCHITECTURES, "linear_only", lambda in_channels, num_classes, image_size: nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes)))
    models = ModelStack.replicate(ModelStack.fresh({**target.spec, "arch": "linear_only", "options": {}}, [0]), [5, 6])
    for name, changes in [("conv_transpose", {}), ("conv_transpose_pseudo", {}), ("prune_reinit", {"prune_layers": ["conv"]})]:
        with pytest.raises(ConfigError, match=f"method '{name}' needs convolution layers, but architecture 'linear_only' has none"):
            configured(params, name, **changes).unlearn(models, unlearn_data, runtime)
    # pruning conv and linear layers works without convolutions: the linear weight and bias are pruned
    pruned = configured(params, "prune_reinit", round_to_half=False, fit={"epochs": 0}).unlearn(models, unlearn_data, runtime)
    changed = sum((pruned.params[k] != models.params[k]).flatten(1).sum(1) for k in ("1.weight", "1.bias"))
    size = models.params["1.weight"][0].numel() + models.params["1.bias"][0].numel()
    assert (changed == round(0.99 * size)).all()


# ------------------------------------------------------------------ ResNet-18 (batch norm)


@pytest.mark.parametrize(
    "runtime",
    [
        pytest.param(Runtime(models_per_pass=2), id="cpu"),
        pytest.param(
            Runtime(device="cuda", models_per_pass=2, bf16=True),
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
            id="cuda-bf16",
        ),
    ],
)
def test_every_method_runs_a_step_on_resnet18(tiny_params, runtime):
    """One training step of 2 runs on 32x32 synthetic images: batch-norm buffers train, outputs stay finite."""
    spec = {"arch": "resnet18", "num_classes": 4, "in_channels": 3, "image_size": 32, "options": {"small_input_stem": True}}
    gen = torch.Generator().manual_seed(0)
    part = lambda n: Part(torch.randn(n, 3, 32, 32, generator=gen), torch.arange(n) % 4, torch.arange(n))  # noqa: E731
    data = UnlearnData(retain=part(8), forget=part(4), val=part(4), num_classes=4, augment=False)
    start = ModelStack.replicate(ModelStack.fresh(spec, [0]), [7, 8])
    for name in METHODS:
        one_step = {block: {"epochs": 1, "batch_size": 8} for block in fit_blocks(tiny_params, name)}
        unlearned = configured(tiny_params, name, **one_step).unlearn(start, data, runtime)
        assert unlearned.n == 2 and set(unlearned.params) == set(start.params)
        assert any(not torch.equal(unlearned.params[k], start.params[k]) for k in start.params), name
        assert not torch.equal(unlearned.buffers["bn1.running_mean"], start.buffers["bn1.running_mean"]), name
        assert torch.isfinite(predict(unlearned, data.forget.x, runtime)).all(), name
