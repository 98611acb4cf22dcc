"""The classic baselines: each changes the model, keeps retain accuracy, and moves forget
accuracy toward the retrained models' (class forgetting, where retrained models score ~0)."""
from __future__ import annotations

import pytest
import torch

from conftest import accuracy
from unlearnops import methods
from unlearnops.config import ConfigError
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, Stream, train_from_scratch

BASELINES = ["finetune", "neggrad_plus", "random_label"]


@pytest.fixture(scope="module")
def retrained_forget_accuracy(class_forget_setup):
    params, data, _, target, runtime = class_forget_setup
    cfg = FitConfig(**{**params["train"]["fit"], "epochs": 15})
    retrained, _ = train_from_scratch(target.spec, [10, 11], Stream(data["retain"].x, data["retain"].y, 32), cfg, runtime, "retrain")
    return float(accuracy(retrained, data["forget"], runtime).mean())


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_forgets_class_and_keeps_retain(name, class_forget_setup, retrained_forget_accuracy):
    params, data, unlearn_data, target, runtime = class_forget_setup
    method = methods.get_method(name, params)
    start = ModelStack.replicate(target, [0, 1, 2, 3])
    unlearned = method.unlearn(start, unlearn_data, runtime)

    assert unlearned.n == 4
    assert any(not torch.equal(unlearned.params[k], start.params[k]) for k in start.params)
    target_forget = float(accuracy(target, data["forget"], runtime).mean())
    target_retain = float(accuracy(target, data["retain"], runtime).mean())
    forget = float(accuracy(unlearned, data["forget"], runtime).mean())
    retain = float(accuracy(unlearned, data["retain"], runtime).mean())
    assert retrained_forget_accuracy < 0.05 < 0.8 < target_forget  # the setting is what we think it is
    # forget accuracy closes at least half of the distance to the retrained models'
    assert forget - retrained_forget_accuracy < 0.5 * (target_forget - retrained_forget_accuracy)
    assert retain > target_retain - 0.1


def test_runs_are_deterministic_and_differ_by_seed(tiny_setup):
    params, _, unlearn_data, target, runtime = tiny_setup
    method = methods.get_method("random_label", params)
    a = method.unlearn(ModelStack.replicate(target, [5, 6]), unlearn_data, runtime)
    b = method.unlearn(ModelStack.replicate(target, [5, 6]), unlearn_data, runtime)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    assert not torch.equal(a.params["0.weight"][0], a.params["0.weight"][1])


def test_unknown_method_and_bad_hyperparameters_are_named(tiny_params):
    with pytest.raises(ConfigError, match="unknown method 'magic'; allowed: .*finetune.*neggrad_plus"):
        methods.get_method("magic", tiny_params)
    tiny_params["methods"]["finetune"]["fit"]["lrate"] = 0.1
    with pytest.raises(ConfigError, match=r"methods.finetune.fit: unknown key\(s\) \['lrate'\]"):
        methods.get_method("finetune", tiny_params).fit_config()
    del tiny_params["methods"]["neggrad_plus"]["alpha"]
    with pytest.raises(ConfigError, match=r"methods.neggrad_plus: missing key\(s\) \['alpha'\]"):
        methods.get_method("neggrad_plus", tiny_params)
