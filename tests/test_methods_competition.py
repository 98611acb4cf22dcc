"""The NeurIPS 2023 competition's top methods and SCRUB: each method's defining step checked
against the authors' rule (xcadet/deepunlearn munl/unlearning/kgltop1-3.py), determinism and
configuration errors; SCRUB's full method against retraining.

All runs use the tiny synthetic setup (4 classes of noisy 8x8 images, 4 models, the default
architecture). The competition methods' whole runs with params.yaml's defaults, on the default
setting, are in test_methods_defaults_competition.py.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import accuracy
from unlearnops import nets
from unlearnops.config import ConfigError
from unlearnops.methods import get_method
from unlearnops.methods.conv_perturb import balanced_class_weights, batch_weighted_cross_entropy, perturb_conv
from unlearnops.methods.grad_reinit import gradient_information, reinitialise, retain_subsample
from unlearnops.methods.kl_contrastive import kl_from_uniform
from unlearnops.methods.retain_passes import retain_steps
from unlearnops.methods.weight_surgery import conv_weight_names
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, Stream, _lr_lambda, cross_entropy_on, fit, predict, train_from_scratch

METHODS = ["kl_contrastive", "grad_reinit", "conv_perturb", "scrub"]
SEEDS = [2000, 2001, 2002, 2003]
# Full-method margins, on means over the 4 models (forget has ~14 samples: one is 0.07):
RETAIN_MARGIN = 0.08  # retain accuracy at least target's minus this
FORGET_MARGIN = 0.10  # forget accuracy no farther from the retrained models' than the target's, plus this
TEST_MARGIN = 0.10  # test accuracy at least target's minus this


def start(target: ModelStack) -> ModelStack:
    return ModelStack.replicate(target, SEEDS)


def with_hparams(params: dict, method: str, **changes) -> dict:
    """params with methods.<method> keys replaced; a dict value updates that nested block."""
    params = copy.deepcopy(params)
    hp = params["methods"][method]
    for key, value in changes.items():
        if isinstance(value, dict):
            hp[key].update(value)
        else:
            hp[key] = value
    return params


@pytest.fixture(scope="module")
def retrained(tiny_setup):
    """Mean accuracies of 4 models trained from scratch on retain (the gold standard)."""
    params, data, _, _, runtime = tiny_setup
    spec = start(tiny_setup[3]).spec
    cfg = FitConfig(**{**params["train"]["fit"], "epochs": 25, "batch_size": 32})
    stack, _ = train_from_scratch(spec, [1000, 1001, 1002, 1003], Stream(data["retain"].x, data["retain"].y, 32), cfg, runtime, "retrain")
    return {part: float(accuracy(stack, data[part], runtime).mean()) for part in ("retain", "forget", "test")}


@pytest.fixture(scope="module")
def unlearned(tiny_setup):
    """Each method run once with the tiny params, cached for the tests that share it."""
    params, _, unlearn_data, target, runtime = tiny_setup
    cache = {}

    def run(name: str) -> ModelStack:
        if name not in cache:
            cache[name] = get_method(name, params).unlearn(start(target), unlearn_data, runtime)
        return cache[name]

    return run


# ---- the full methods ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scrub"])  # the competition methods: test_methods_defaults_competition.py
def test_method_keeps_retain_accuracy_and_forget_near_retrained(name, tiny_setup, retrained, unlearned):
    _, data, _, target, runtime = tiny_setup
    models = unlearned(name)
    assert models.n == len(SEEDS)
    mean = {part: float(accuracy(models, data[part], runtime).mean()) for part in ("retain", "forget", "test")}
    before = {part: float(accuracy(target, data[part], runtime).mean()) for part in ("retain", "forget", "test")}
    print(f"\n{name}: target {before}  retrain {retrained}  method {mean}")
    assert mean["retain"] >= before["retain"] - RETAIN_MARGIN
    assert mean["test"] >= before["test"] - TEST_MARGIN
    assert abs(mean["forget"] - retrained["forget"]) <= abs(before["forget"] - retrained["forget"]) + FORGET_MARGIN


@pytest.mark.parametrize("name", METHODS)
def test_same_seeds_give_identical_models(name, tiny_setup, unlearned):
    params, _, unlearn_data, target, runtime = tiny_setup
    again = get_method(name, params).unlearn(start(target), unlearn_data, runtime)
    first = unlearned(name)
    assert all(torch.equal(first.params[k], again.params[k]) for k in first.params)
    # ...while every run differs from the others (its own data order and random draws).
    weights = torch.cat([v.flatten(1) for v in first.params.values()], dim=1)
    assert len({tuple(w.tolist()) for w in weights}) == len(SEEDS)


# ---- kl_contrastive -------------------------------------------------------------------------


def test_first_stage_is_kl_from_uniform_as_torch_kldivloss_computes_it():
    """The authors' nn.KLDivLoss(batchmean)(log_softmax(out), uniform) is KL(u || p), not KL(p || u)."""
    logits = torch.tensor([[4.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4]])
    uniform = torch.full_like(logits, 0.25)
    authors = nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(logits, -1), uniform)
    assert torch.allclose(kl_from_uniform(logits), authors)
    p = logits.softmax(-1)
    kl_u_p = (uniform * (uniform.log() - p.log())).sum(-1).mean()
    kl_p_u = (p * (p.log() - uniform.log())).sum(-1).mean()
    assert torch.allclose(kl_from_uniform(logits), kl_u_p) and not torch.allclose(kl_from_uniform(logits), kl_p_u)


def test_kl_phase_makes_forget_outputs_less_confident(tiny_setup):
    params, data, unlearn_data, target, runtime = tiny_setup
    models = get_method("kl_contrastive", params).push_to_uniform(start(target), unlearn_data, runtime)

    def kl(stack):
        return torch.stack([kl_from_uniform(logits) for logits in predict(stack, data["forget"].x, runtime)])

    before, after = float(kl(target)), kl(models)
    assert bool((after < before).all()), (before, after)


def test_contrastive_passes_share_one_cosine_schedule(tiny_params):
    """Round r's lr is torch's CosineAnnealingLR over all rounds' forget steps, at round r's step."""
    method = get_method("kl_contrastive", tiny_params)
    cfg, rounds = method.hp.contrast, method.hp.rounds
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=rounds, eta_min=method.hp.eta_min)
    for r in range(rounds):  # forget set <= one batch: one step per round
        assert method.contrast_lr(r, n_forget=cfg.batch_size) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_partial_retain_passes_take_the_fraction_of_the_steps(tiny_setup):
    """retain_fraction x the batches of a pass, and the engine's steps_per_epoch runs exactly
    that many steps per epoch, drawn from all of retain (the shuffle continuing across epochs)."""
    _, data, _, target, runtime = tiny_setup
    retain = data["retain"]
    batches = -(-len(retain) // 16)
    assert retain_steps(len(retain), 16, 0.5) == round(0.5 * batches) and retain_steps(len(retain), 16, 1.0) == batches
    cfg = FitConfig(epochs=2, batch_size=16, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, schedule="constant")
    steps, epochs = [], []
    fit(
        ModelStack.replicate(target, [0, 1]), {"retain": Stream(retain.x, retain.y, 16)}, cross_entropy_on("retain"), cfg, runtime, driver="retain",
        steps_per_epoch=retain_steps(len(retain), 16, 0.5), on_step=lambda n, index, live: steps.append(n), on_epoch_end=lambda e, index, live: epochs.append((e, len(steps))),
    )
    assert epochs == [(1, round(0.5 * batches)), (2, 2 * round(0.5 * batches))]


def test_contrastive_pass_lowers_the_contrastive_loss(tiny_setup):
    params, data, unlearn_data, target, runtime = tiny_setup
    method = get_method("kl_contrastive", params)
    negatives = data["retain"].x[: method.hp.negatives_batch_size]

    def contrastive_loss(stack):
        out_f, out_r = predict(stack, data["forget"].x, runtime), predict(stack, negatives, runtime)
        return -torch.log_softmax(out_f @ out_r.transpose(1, 2) / method.hp.temperature, dim=-1).mean((1, 2))

    before = contrastive_loss(start(target))
    after = contrastive_loss(method.contrastive_pass(start(target), unlearn_data, runtime, round_index=0))
    assert bool((after < before).all()), (before, after)


# ---- grad_reinit -----------------------------------------------------------------------------


def test_grad_reinit_resets_the_fraction_of_each_conv_layer_with_smallest_gradient(tiny_setup):
    params, _, unlearn_data, target, runtime = tiny_setup
    method = get_method("grad_reinit", params)
    models = start(target)
    masks = method.reset_masks(models, unlearn_data, runtime)
    assert list(masks) == conv_weight_names(models.spec, "test")  # every conv, 1x1 shortcuts included
    grads = gradient_information(models, unlearn_data, method.hp.gradient_batch_size, runtime)
    fraction = method.hp.reinit_fraction
    for name, mask in masks.items():  # per layer (the authors' loop), not ranked across layers
        chosen, scores = mask.flatten(1), grads[name].abs().flatten(1)
        assert chosen.sum(1).tolist() == [round(fraction * chosen.shape[1])] * len(SEEDS), name
        for i in range(len(SEEDS)):
            assert float(scores[i][chosen[i]].max()) <= float(scores[i][~chosen[i]].min()), name
    assert not torch.equal(masks[next(iter(masks))][0], masks[next(iter(masks))][1])  # each model its own retain subsample

    reset = reinitialise(models, masks)
    for name, mask in masks.items():
        assert torch.equal(reset.params[name][~mask], models.params[name][~mask])
        assert bool((reset.params[name][mask] != models.params[name][mask]).all())
        weight = models.params[name]
        fan_out = weight.shape[1] * weight[0, 0, 0].numel()
        fresh = reset.params[name][mask]
        if fresh.numel() >= 100:  # He init, fan_out: std sqrt(2 / fan_out)
            assert abs(float(fresh.std()) / (2 / fan_out) ** 0.5 - 1) < 0.2
    assert all(torch.equal(reset.params[k], models.params[k]) for k in models.params if k not in masks)


def test_gradient_information_is_retain_descent_plus_forget_ascent(tiny_setup):
    """The authors accumulate d CE_mean(retain subsample) - d CE_mean(forget), one batch each here."""
    params, _, unlearn_data, target, runtime = tiny_setup
    method = get_method("grad_reinit", params)
    models = start(target).select([0])
    grads = gradient_information(models, unlearn_data, method.hp.gradient_batch_size, runtime)
    rows = retain_subsample(models.seeds, len(unlearn_data.retain), len(unlearn_data.forget))[0]
    model = target.module(0)
    loss = F.cross_entropy(model(unlearn_data.retain.x[rows]), unlearn_data.retain.y[rows]) - F.cross_entropy(model(unlearn_data.forget.x), unlearn_data.forget.y)
    expected = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    for name, value in expected.items():
        assert torch.allclose(grads[name][0], value, atol=1e-5), name


def test_grad_reinit_slows_only_the_kept_conv_weights(tiny_setup):
    params, _, unlearn_data, target, runtime = tiny_setup
    # With kept_lr_factor 0 and no weight decay the kept conv weights stay exactly; the reset
    # ones, BatchNorm and the head train at the full rate (the authors mask conv gradients only).
    params = with_hparams(params, "grad_reinit", kept_lr_factor=0.0, fit={"weight_decay": 0.0})
    method = get_method("grad_reinit", params)
    models = start(target)
    masks = method.reset_masks(models, unlearn_data, runtime)
    reset = reinitialise(models, masks)
    tuned = method.unlearn(models, unlearn_data, runtime)
    for name in models.params:
        if name in masks:
            assert torch.equal(tuned.params[name][~masks[name]], models.params[name][~masks[name]]), name
            assert float((tuned.params[name] - reset.params[name])[masks[name]].abs().mean()) > 1e-5, name
        else:
            assert not torch.equal(tuned.params[name], models.params[name]), f"{name} (not a conv weight) did not train"


# ---- conv_perturb ----------------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["first", "all"])
def test_conv_perturb_adds_noise_of_the_given_std_to_the_chosen_layers(layers, tiny_setup):
    params, _, _, target, _ = tiny_setup
    method = get_method("conv_perturb", with_hparams(params, "conv_perturb", layers=layers))
    models = start(target)
    names = method.perturbed_layers(models.spec)
    convs = conv_weight_names(models.spec, "test")
    assert names == (convs[:1] if layers == "first" else convs)
    std = method.hp.noise_std
    noisy = perturb_conv(models, names, std, salt=1)
    for name, value in models.params.items():
        if name not in names:
            assert torch.equal(noisy.params[name], value), name
            continue
        noise = noisy.params[name] - value
        assert abs(float(noise.std()) / std - 1) < 0.2  # 144+ draws: a 20% band is ~3 standard errors
        assert abs(float(noise.mean())) < 0.2
        assert not torch.equal(noise[0], noise[1])  # every model its own noise


def test_class_weighting_is_the_authors_balanced_batch_scale():
    from sklearn.utils.class_weight import compute_class_weight

    y = torch.tensor([0, 0, 0, 1, 2, 2])
    balanced = compute_class_weight(class_weight="balanced", classes=np.array([0, 1, 2]), y=y.numpy())
    assert torch.allclose(balanced_class_weights(y, 4), torch.tensor([*balanced, 0.0], dtype=torch.float32))
    # CustomCrossEntropyLoss: mean CE times the batch's mean weight (not a per-sample weighting)
    logits, batch = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1])
    weights = balanced_class_weights(y, 4)
    expected = F.cross_entropy(logits, batch) * weights[batch].mean()
    assert torch.allclose(batch_weighted_cross_entropy(logits, batch, weights), expected)


def test_conv_perturb_schedule_steps_per_epoch_like_torch_cosine(tiny_setup):
    """conv_perturb fits with the engine's per-epoch schedule, whose epoch e is torch's
    CosineAnnealingLR stepped once per epoch."""
    params, _, unlearn_data, target, runtime = tiny_setup
    method = get_method("conv_perturb", params)
    seen = {}
    method.fit = lambda data, models, streams, loss, cfg, runtime, **options: seen.update(options) or models
    method.unlearn(start(target), unlearn_data, runtime)
    assert seen["schedule_per_epoch"] is True
    cfg = FitConfig(**{**vars(method.hp.fit), "epochs": 4})
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    for epoch in range(cfg.epochs):
        assert cfg.lr * _lr_lambda(cfg, cfg.epochs)(epoch) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        optimizer.step()
        scheduler.step()


def test_conv_perturb_reperturbs_before_the_last_epoch(tiny_setup):
    """At lr 0 the training leaves the weights alone: the first conv ends at w + the first noise
    (noise_std) + the re-perturbation (reperturb_std), every other weight unchanged."""
    params, _, unlearn_data, target, runtime = tiny_setup
    params = with_hparams(params, "conv_perturb", fit={"lr": 0.0, "weight_decay": 0.0})
    method = get_method("conv_perturb", params)
    models = start(target)
    out = method.unlearn(models, unlearn_data, runtime)
    names = method.perturbed_layers(models.spec)
    expected = perturb_conv(perturb_conv(models, names, method.hp.noise_std, salt=1), names, method.hp.reperturb_std, salt=2)
    for name in models.params:
        assert torch.allclose(out.params[name], expected.params[name], atol=1e-6), name
    light = perturb_conv(models, names, method.hp.reperturb_std, salt=2).params[names[0]] - models.params[names[0]]
    assert abs(float(light.std()) / method.hp.reperturb_std - 1) < 0.2


# ---- configuration errors --------------------------------------------------------------------


@pytest.mark.parametrize("name,key", [("kl_contrastive", "temperature"), ("grad_reinit", "reinit_fraction"), ("conv_perturb", "noise_std"), ("scrub", "alpha")])
def test_missing_or_unknown_hyperparameter_is_a_config_error(name, key, tiny_params):
    params = copy.deepcopy(tiny_params)
    del params["methods"][name][key]
    with pytest.raises(ConfigError, match=f"methods.{name}: missing key.*{key}"):
        get_method(name, params)
    params = copy.deepcopy(tiny_params)
    params["methods"][name]["bogus"] = 1
    with pytest.raises(ConfigError, match=f"methods.{name}: unknown key.*bogus"):
        get_method(name, params)
    block = "retain_round" if name == "kl_contrastive" else "fit"
    params = copy.deepcopy(tiny_params)
    del params["methods"][name][block]["lr"]
    with pytest.raises(ConfigError, match=f"methods.{name}.{block}: missing key.*lr"):
        get_method(name, params)


@pytest.mark.parametrize(
    "name,changes,message",
    [
        ("conv_perturb", {"layers": "middle"}, "unknown methods.conv_perturb.layers 'middle'; allowed: first, all"),
        ("kl_contrastive", {"contrast": {"schedule": "linear"}}, "unknown methods.kl_contrastive.contrast.schedule 'linear'; allowed: cosine, constant"),
        ("kl_contrastive", {"retain_fraction": 0.0}, r"retain_fraction must be a number in \(0, 1\], got 0.0"),
        ("conv_perturb", {"retain_fraction": 1.5}, r"retain_fraction must be a number in \(0, 1\], got 1.5"),
        ("grad_reinit", {"reinit_fraction": 1.5}, r"reinit_fraction must be in \[0, 1\], got 1.5"),
        ("grad_reinit", {"fit": {"optimizer": "adam"}}, "kept_lr_factor needs fit.optimizer 'sgd'"),
        ("scrub", {"temperature": 0}, "temperature > 0"),
    ],
)
def test_bad_hyperparameter_values_are_config_errors(name, changes, message, tiny_params):
    with pytest.raises(ConfigError, match=message):
        get_method(name, with_hparams(tiny_params, name, **changes))


@pytest.mark.parametrize("name", ["grad_reinit", "conv_perturb"])
def test_methods_needing_convolutions_reject_an_architecture_without_any(name, tiny_setup, monkeypatch):
    params, data, unlearn_data, _, runtime = tiny_setup

    def linear_only(in_channels, num_classes, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, 16), nn.ReLU(), nn.Linear(16, num_classes))

    monkeypatch.setitem(nets.ARCHITECTURES, "linear_only", linear_only)
    spec = {"arch": "linear_only", "num_classes": data.num_classes, "in_channels": data.in_channels, "image_size": data.image_size, "options": {}}
    with pytest.raises(ConfigError, match=f"method '{name}' needs convolution layers, but architecture 'linear_only' has none"):
        get_method(name, params).unlearn(ModelStack.fresh(spec, [0, 1]), unlearn_data, runtime)
