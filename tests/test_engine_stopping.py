"""The seed study's stopping rule: a model stops once its monitored accuracies converged, stays
as it was from then on, and its result does not depend on the models trained beside it."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from unlearnops.config import ConfigError, build_dataclass
from unlearnops.data import Part, load_synthetic_source
from unlearnops.methods.base import UnlearnData, Unlearner
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, Monitor, Runtime, Stream, cross_entropy_on, fit, predict

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = Runtime("cpu", models_per_pass=8)
PATIENCE = 2  # params.yaml has the rule off (0); the tolerance is params.yaml's


@pytest.fixture(scope="module")
def parts() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic 8x8 images of 4 classes: 240 to train on (the retain part), 80 to validate."""
    source = load_synthetic_source({"synthetic": dict(n_samples=320, n_classes=4, image_size=8, channels=1, noise=0.35, seed=0)})
    x = source.images.float() / 255
    x, y = (x - x.mean()) / x.std(), source.labels
    return {"retain": (x[:240], y[:240]), "val": (x[240:], y[240:])}


@pytest.fixture(scope="module")
def spec(repo_params) -> dict:
    return {"arch": "small_resnet", "num_classes": 4, "in_channels": 1, "image_size": 8, "options": dict(repo_params["model"]["small_resnet"])}


@pytest.fixture(scope="module")
def finetune_cfg(repo_params) -> FitConfig:
    """Fine-tuning as the engine's tests know it (params.yaml's train.fit, 2 epochs) with the stopping
    rule switched on. (methods.finetune.fit's batch 16 x 1 epoch leaves the rule nothing to do.)"""
    return build_dataclass(FitConfig, {**repo_params["train"]["fit"], "epochs": 2, "stop_patience": PATIENCE}, "train.fit")


@pytest.fixture(scope="module")
def start(spec, parts) -> ModelStack:
    """Four partly trained models to fine-tune (different seeds: they converge at different epochs)."""
    x, y = parts["retain"]
    cfg = FitConfig(epochs=2, batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="constant")
    return fit(ModelStack.fresh(spec, [0, 1, 2, 3]), {"retain": Stream(x, y, 64)}, cross_entropy_on("retain"), cfg, CPU, driver="retain")


def finetune(models: ModelStack, parts, cfg: FitConfig, runtime: Runtime = CPU, **options) -> tuple[ModelStack, torch.Tensor]:
    x, y = parts["retain"]
    monitor = Monitor(parts)
    trained = fit(models, {"retain": Stream(x, y, cfg.batch_size)}, cross_entropy_on("retain"), cfg, runtime, driver="retain", monitor=monitor, **options)
    return trained, monitor.epochs


def accuracies(models: ModelStack, parts) -> torch.Tensor:
    """[N, parts] accuracy of every model on every part."""
    return torch.stack([(predict(models, x, CPU).argmax(-1) == y).float().mean(1) for x, y in parts.values()], dim=1)


def test_a_model_stops_where_the_rule_says_and_stays_there(start, parts, finetune_cfg):
    """Against the same fine-tuning without the rule, recorded after every epoch: each model is
    its state at the first epoch that ends `patience` epochs of accuracy changes below the
    tolerance (BatchNorm statistics included), and fit ends once all models stopped. Over 6
    epochs: 2 leave the rule no room to stop models at different epochs."""
    cfg = FitConfig(**{**finetune_cfg.__dict__, "epochs": 6})
    history = [start]
    record = lambda epoch, index, models: history.append(ModelStack(models.spec, {k: v.clone() for k, v in models.params.items()}, {k: v.clone() for k, v in models.buffers.items()}, models.seeds))  # noqa: E731
    finetune(start, parts, FitConfig(**{**cfg.__dict__, "stop_patience": 0}), on_epoch_end=record)
    measured = torch.stack([accuracies(models, parts) for models in history])  # [epochs + 1, N, parts]
    calm = ((measured[1:] - measured[:-1]).abs() < cfg.stop_tolerance).all(-1)  # [epochs, N]
    expected = []
    for i in range(start.n):
        run = 0
        for epoch in range(1, cfg.epochs + 1):
            run = run + 1 if calm[epoch - 1, i] else 0
            if run == cfg.stop_patience:
                break
        expected.append(epoch)

    epochs_seen = []
    stopped, epochs = finetune(start, parts, cfg, on_epoch_end=lambda epoch, index, models: epochs_seen.append(epoch))
    assert epochs.tolist() == expected
    assert len(set(expected)) > 1 and min(expected) < cfg.epochs  # the rule acted, and not alike for every model
    assert epochs_seen == list(range(1, max(expected) + 1))  # fit ended when the last model stopped
    for i, epoch in enumerate(expected):
        for k in start.params:
            torch.testing.assert_close(stopped.params[k][i], history[epoch].params[k][i], rtol=1e-4, atol=1e-5)
        for k in start.buffers:
            torch.testing.assert_close(stopped.buffers[k][i], history[epoch].buffers[k][i], rtol=1e-4, atol=1e-5)


def test_a_stopped_model_does_not_depend_on_its_companions(start, parts, finetune_cfg):
    together, epochs_together = finetune(start, parts, finetune_cfg)
    in_passes, epochs_in_passes = finetune(start, parts, finetune_cfg, Runtime("cpu", models_per_pass=3))
    alone = [finetune(start.select([i]), parts, finetune_cfg) for i in range(start.n)]
    epochs_alone = torch.cat([epochs for _, epochs in alone])
    assert epochs_together.tolist() == epochs_alone.tolist() == epochs_in_passes.tolist()
    alone = ModelStack.concat([models for models, _ in alone])
    for other in (alone, in_passes):
        for k in together.params:
            torch.testing.assert_close(together.params[k], other.params[k], rtol=1e-4, atol=1e-5)
        for k in together.buffers:
            torch.testing.assert_close(together.buffers[k], other.buffers[k], rtol=1e-4, atol=1e-5)


def test_rule_off_trains_every_epoch_and_bad_settings_fail(start, parts, finetune_cfg):
    off = FitConfig(**{**finetune_cfg.__dict__, "stop_patience": 0})
    _, epochs = finetune(start, parts, off)
    assert epochs.tolist() == [off.epochs] * start.n
    x, y = parts["retain"]
    with pytest.raises(ConfigError, match="monitors no data"):
        fit(start, {"retain": Stream(x, y, 64)}, cross_entropy_on("retain"), finetune_cfg, CPU, driver="retain")
    with pytest.raises(ConfigError, match="stop_tolerance"):
        FitConfig(**{**finetune_cfg.__dict__, "stop_tolerance": 0.0})
    with pytest.raises(ConfigError, match="stop_patience"):
        FitConfig(**{**finetune_cfg.__dict__, "stop_patience": -1})


def test_unlearner_fit_monitors_retain_and_validation(start, parts, finetune_cfg):
    """Methods reach the rule through Unlearner.fit: it watches data.retain and data.val and
    records the epochs every run trained."""

    class Stopping(Unlearner):
        name = "stopping"

        @dataclass
        class Hparams:
            fit: FitConfig

        def unlearn(self, models, data, runtime):
            return self.fit(data, models, {"retain": self.retain_stream(data)}, cross_entropy_on("retain"), self.hp.fit, runtime, driver="retain", desc="finetune")

    def part(name):
        x, y = parts[name]
        return Part(x, y, ids=torch.arange(len(y)).numpy())

    data = UnlearnData(retain=part("retain"), forget=part("val"), val=part("val"), num_classes=4, augment=False)
    method = Stopping({"fit": {**finetune_cfg.__dict__}}, {})
    unlearned = method.unlearn(start, data, CPU)
    expected, epochs = finetune(start, parts, finetune_cfg)
    assert [desc for desc, _ in method.fit_epochs] == ["finetune"]
    assert method.fit_epochs[0][1].tolist() == epochs.tolist()
    torch.testing.assert_close(unlearned.params["0.weight"], expected.params["0.weight"])


def test_finetune_reaches_the_stopping_rule_through_its_params(tiny_setup, one_thread):
    """methods.finetune.fit.stop_patience is the user's switch: finetune fits through
    Unlearner.fit, which monitors retain and validation and records each run's epochs."""
    import copy

    from unlearnops.methods import get_method

    params, _, unlearn_data, target, runtime = tiny_setup
    params = copy.deepcopy(params)
    params["methods"]["finetune"]["fit"].update(epochs=6, stop_patience=PATIENCE)
    method = get_method("finetune", params)
    method.unlearn(ModelStack.replicate(target, [2000, 2001]), unlearn_data, runtime)
    (desc, epochs), = method.fit_epochs
    assert desc == "finetune" and epochs.shape == (2,) and bool(((epochs >= PATIENCE) & (epochs <= 6)).all())


# Each kind of fit a method makes: one loss over retain (grad_reinit, a competition method),
# passes with one optimiser (scrub: max and min passes), rounds of several fits (kl_contrastive).
STOPPING_SECTIONS = {"grad_reinit": ("fit", "epochs"), "scrub": ("fit", "epochs"), "kl_contrastive": ("retain_round", None)}


@pytest.mark.parametrize("name", list(STOPPING_SECTIONS))
def test_the_stopping_rule_takes_effect_in_every_kind_of_method_fit(name, tiny_setup, one_thread):
    """params.yaml's methods.<name>.<section>.stop_patience is the switch: with it on, every run
    stops before the most epochs (rounds) it may train, and the method records what each run
    trained; off, every run trains them all. The tolerance is 0.05 here: the tiny data set's
    validation part has 40 samples, one of which is 0.025 of accuracy."""
    import copy

    from unlearnops.methods import get_method

    params, _, unlearn_data, target, runtime = tiny_setup
    section, epochs_key = STOPPING_SECTIONS[name]
    most = 6
    params = copy.deepcopy(params)
    hp = params["methods"][name]
    if epochs_key:
        hp[section][epochs_key] = most
    else:
        hp["rounds"] = most
    seeds = [2000, 2001]

    def trained(patience: int) -> torch.Tensor:
        hp[section].update(stop_patience=patience, stop_tolerance=0.05)
        method = get_method(name, params)
        method.unlearn(ModelStack.replicate(target, seeds), unlearn_data, runtime)
        return method.fit_epochs[-1][1]

    assert trained(0).tolist() == [most] * len(seeds)
    stopped = trained(1)
    assert bool(((stopped >= 1) & (stopped < most)).all()), stopped
