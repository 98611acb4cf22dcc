"""params.yaml checked before any stage runs (`unlearnops repro`): every problem as one line.

A misspelt method, data set or architecture would otherwise fail only when its stage runs, after
minutes of upstream work. The checks build what the stages build from params (data set source,
architecture, each method with its hyperparameters in every setting, the deletion
flow's choices) without touching data or models.
"""
from __future__ import annotations

from unlearnops.config import ConfigError, choose
from unlearnops.layout import dataset_params, run_names, setting_params

_PROBLEMS = (ConfigError, KeyError, TypeError, ValueError)


def _message(err: Exception) -> str:
    return f"missing key {err}" if isinstance(err, KeyError) else str(err)


def problems(params: dict) -> list[str]:
    """Every problem of `params` found without running anything, one line each (empty: fine)."""
    from unlearnops import data, methods, nets

    found: list[str] = []

    def check(where: str, test) -> bool:
        try:
            test()
            return True
        except _PROBLEMS as err:
            message = _message(err)
            line = message if message.startswith(where.split(" ")[0]) else f"{where}: {message}"
            if line not in found:  # a method's problem shows in every setting: say it once
                found.append(line)
            return False

    available = methods.available()
    unlearn = (params.get("unlearn") or {}).get("methods") or []
    condensed = (params.get("condense") or {}).get("methods") or []
    if not unlearn:
        found.append("unlearn.methods: empty; list at least one of: " + ", ".join(available))
    for key, names in (("unlearn.methods", unlearn), ("condense.methods", condensed)):
        for name in names:
            check(key, lambda name=name: choose(name, available, "method"))
    if len(set(run_names(params))) != len(run_names(params)):
        found.append("unlearn.methods / condense.methods: a method is listed twice")

    datasets = list(params.get("datasets") or {})
    if not datasets:
        found.append("datasets: empty; the grid needs at least one data set")
    for dataset in datasets:
        def dataset_checks(dataset=dataset):
            p = dataset_params(params, dataset)
            choose(p["data"]["name"], data.SOURCES, "dataset")
            choose(p["model"]["arch"], nets.ARCHITECTURES, "architecture")
        check(f"datasets.{dataset}", dataset_checks)

    settings = list(params.get("settings") or {})
    if not settings:
        found.append("settings: empty; the grid needs at least one setting")
    for setting in settings:
        merged = {}
        if not check(f"settings.{setting}", lambda setting=setting, merged=merged: merged.update(setting_params(params, setting))):
            continue
        check(f"settings.{setting}.forget", lambda merged=merged: choose(merged["forget"]["mode"], data.FORGET_MODES, "forget mode"))
        for name in unlearn + condensed:
            if name in available:
                check(f"methods.{name}", lambda name=name, merged=merged: methods.get_method(name, merged))

    ops = params.get("ops") or {}
    if ops:
        check("ops.dataset", lambda: choose(ops.get("dataset"), datasets, "ops.dataset (a data set of `datasets`)"))
        if ops.get("method", "auto") != "auto":
            check("ops.method", lambda: methods.get_method(ops["method"], params))
        else:
            check("ops.benchmark_setting", lambda: choose(ops.get("benchmark_setting"), settings, "ops.benchmark_setting (a setting of `settings`)"))
        check("ops.fallback_method", lambda: methods.get_method(ops.get("fallback_method"), params))
    return found
