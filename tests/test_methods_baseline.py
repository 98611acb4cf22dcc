"""The classic baselines (finetune, neggrad_plus, random_label): determinism and configuration
errors. Their whole-method behaviour with params.yaml's defaults, on the default setting, is
checked in test_methods_defaults_others.py."""
from __future__ import annotations

import copy
import dataclasses

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
        methods.get_method("finetune", tiny_params)
    del tiny_params["methods"]["neggrad_plus"]["alpha"]
    with pytest.raises(ConfigError, match=r"methods.neggrad_plus: missing key\(s\) \['alpha'\]"):
        methods.get_method("neggrad_plus", tiny_params)


@pytest.mark.parametrize("name", ["scrub", "finetune", "muso"])
def test_fit_sections_are_typed_and_checked_when_the_method_is_built(tiny_params, name):
    """methods.<name>.fit becomes a FitConfig once, when the method is built; a bad value fails
    then, named by its key path."""
    from unlearnops.training import FitConfig

    assert isinstance(methods.get_method(name, tiny_params).hp.fit, FitConfig)
    for value, message in ((-0.1, "must be >= 0, got -0.1"), ("fast", "expected a number, got 'fast'"), (True, "expected a number, got True")):
        params = copy.deepcopy(tiny_params)
        params["methods"][name]["fit"]["lr"] = value
        with pytest.raises(ConfigError, match=rf"^methods\.{name}\.fit\.lr: {message}$"):
            methods.get_method(name, params)
    params = copy.deepcopy(tiny_params)
    params["methods"][name]["fit"]["schedule"] = "step"
    with pytest.raises(ConfigError, match=rf"^methods\.{name}\.fit\.schedule: unknown value 'step'"):
        methods.get_method(name, params)
    params["methods"][name]["fit"] = [1, 2]
    with pytest.raises(ConfigError, match=rf"^methods\.{name}\.fit: expected a mapping"):
        methods.get_method(name, params)


def test_every_method_builds_from_params_yaml_with_typed_fit_sections(repo_params):
    from unlearnops.training import FitConfig

    for name in repo_params["unlearn"]["methods"]:
        method = methods.get_method(name, repo_params)
        sections = [f.name for f in dataclasses.fields(method.Hparams) if isinstance(getattr(method.hp, f.name), FitConfig)]
        assert sections or name == "layered", name
