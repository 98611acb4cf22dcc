"""The classic baselines (finetune, neggrad_plus, random_label): determinism and configuration
errors. Their whole-method behaviour with params.yaml's defaults, on the default setting, is
checked in test_methods_defaults_others.py."""
from __future__ import annotations

import pytest
import torch

from unlearnops import methods
from unlearnops.config import ConfigError
from unlearnops.stack import ModelStack


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
