"""The DVC stages' work: read params and inputs, call the library, write outputs, log to MLflow.

Each function is one step of dvc.yaml; `stages/<name>.py` only calls it. The benchmark is a grid
(params.yaml `datasets` x `settings` x methods); one setting's params are the global sections
merged with its data set's and its own overrides (`setting_params`), and its files sit in its own
folders (`layout`):

  data/split/<dataset>/         images.pt, samples.csv: the split, the same for every setting of the data set
  data/prepared/<setting>/      samples.csv: the split and this setting's forget set
  models/<dataset>/target/      the target, trained once per data set
  models/<setting>/retrain/     retrained models; models/<setting>/unlearned/<run>/: each method's runs
  models/<setting>/inputs.json  hashes of the split and target the setting's runs read (a DVC dependency)
  metrics/<setting>/*.json      small, flat numbers for `dvc metrics show`; metrics/<dataset>/target.json
  evaluation/<setting>/         the full evidence: <run>.json, <run>.npz, retrain_mia.json, relearn/

Called without a setting, the functions use one flat layout (data/prepared, models/target,
metrics/methods, ...) with `params` as given: the deletion flow's data and a single run.

Every stage is a fresh process, so MLflow, scikit-learn, the registry and the methods are imported
only in the functions that use them.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path

from unlearnops import data as data_lib
from unlearnops import tracking
from unlearnops.config import ConfigError, choose
from unlearnops.files import write_json

PREPARED = Path("data/prepared")
SPLIT = Path("data/split")
MODELS = Path("models")
TARGET = MODELS / "target"
RETRAIN = MODELS / "retrain"
UNLEARNED = MODELS / "unlearned"
METRICS = Path("metrics")
EVALUATION = Path("evaluation")
RETRAIN_MIA = METRICS / "retrain_mia.json"  # the evaluate_retrain stage: retrain's membership inference
REPORTS = Path("reports")

DATASET_SECTIONS = ("data", "model", "train")  # what a data set may override: what its target depends on
SETTING_KEYS = ("dataset", "forget")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a folder name, a DVC stage-name part and a params key (DVC reads a dot as nesting)


# ---------------------------------------------------------------- the grid


def _merge(base: dict, overrides: dict, where: str) -> dict:
    """`base` with `overrides` merged in, nested mappings key by key; a key `base` lacks is an error."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where} must be a mapping, got {overrides!r}")
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if key not in base:
            raise ConfigError(f"{where}: unknown key '{key}'; allowed: {', '.join(map(str, base))}")
        nested = isinstance(base[key], dict) and isinstance(value, dict)
        merged[key] = _merge(base[key], value, f"{where}.{key}") if nested else copy.deepcopy(value)
    return merged


def _entry(params: dict, section: str, name: str, allowed: tuple[str, ...]) -> dict:
    """params[section][name], checked: a safe name, a known entry, only `allowed` keys."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ConfigError(f"{section} name {name!r} must be letters, digits, '_' or '-' (a folder, a DVC stage name and a params key: no '.')")
    entries = params.get(section) or {}
    choose(name, entries, section[:-1])
    entry = entries[name] or {}
    if not isinstance(entry, dict):
        raise ConfigError(f"{section}.{name} must be a mapping, got {entry!r}")
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ConfigError(f"{section}.{name}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    return entry


def dataset_params(params: dict, dataset: str) -> dict:
    """The params of one data set of the grid: `data`, `model`, `train` with `datasets.<dataset>`'s
    overrides merged in; data.name defaults to the data set's name."""
    entry = _entry(params, "datasets", dataset, DATASET_SECTIONS)
    merged = copy.deepcopy(params)
    merged["data"]["name"] = dataset
    for section in DATASET_SECTIONS:
        merged[section] = _merge(merged[section], entry.get(section) or {}, f"datasets.{dataset}.{section}")
    return merged


def setting_params(params: dict, setting: str) -> dict:
    """The params of one setting: its data set's (`dataset_params`) with `settings.<setting>.forget` merged in."""
    entry = _entry(params, "settings", setting, SETTING_KEYS)
    if "dataset" not in entry:
        raise ConfigError(f"settings.{setting} needs a dataset (one of: {', '.join(params.get('datasets') or {})})")
    merged = dataset_params(params, entry["dataset"])
    merged["forget"] = _merge(params["forget"], entry.get("forget") or {}, f"settings.{setting}.forget")
    return merged


def settings(params: dict) -> list[str]:
    """Every setting of the grid, each checked (a bad one fails here, before any work)."""
    names = list(params.get("settings") or {})
    if not names:
        raise ConfigError("params.yaml has no settings: the grid needs at least one")
    for name in names:
        setting_params(params, name)
    return names


def dataset_of(params: dict, setting: str) -> str:
    return _entry(params, "settings", setting, SETTING_KEYS)["dataset"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one setting's stages read and write (a data set's own stages: the first four)."""

    split: Path                     # images.pt of the data set
    prepared: Path                  # samples.csv: split and forget set
    target: Path
    target_metrics: Path
    retrain: Path | None = None
    unlearned: Path | None = None   # <run>/ per unlearning run
    metrics: Path | None = None     # prepare.json, retrain.json (and <run>.json headlines in the grid)
    evidence: Path | None = None    # <run>.json: everything evaluate measured
    relearn: Path | None = None     # relearn/<name>.json lives here
    arrays: Path | None = None      # <run>.npz: per-example epsilons and confidences
    retrain_mia: Path | None = None
    headlines: bool = False         # write metrics/<setting>/<run>.json for `dvc metrics show`


FLAT = Layout(PREPARED, PREPARED, TARGET, METRICS / "target.json", RETRAIN, UNLEARNED, METRICS, METRICS / "methods",
              METRICS, EVALUATION, RETRAIN_MIA)


def dataset_layout(dataset: str) -> Layout:
    """A data set's split (read as data without a forget set) and its target."""
    return Layout(SPLIT / dataset, SPLIT / dataset, MODELS / dataset / "target", METRICS / dataset / "target.json")


def layout(params: dict, setting: str | None = None) -> Layout:
    if setting is None:
        return FLAT
    evidence = EVALUATION / setting
    return dataclasses.replace(
        dataset_layout(dataset_of(params, setting)),
        prepared=PREPARED / setting,
        retrain=MODELS / setting / "retrain",
        unlearned=MODELS / setting / "unlearned",
        metrics=METRICS / setting,
        evidence=evidence,
        relearn=evidence,
        arrays=evidence,
        retrain_mia=evidence / "retrain_mia.json",
        headlines=True,
    )


def _params_of(params: dict, setting: str | None) -> tuple[dict, Layout]:
    return (params if setting is None else setting_params(params, setting)), layout(params, setting)


def ops_dataset(params: dict) -> str:
    """`ops.dataset`, the production data set: its target becomes the deletion flow's first champion."""
    dataset = params["ops"]["dataset"]
    _entry(params, "datasets", dataset, DATASET_SECTIONS)
    return dataset


# ---------------------------------------------------------------- stages


def seeds(base: int, n: int) -> list[int]:
    return [base + i for i in range(n)]


def _load_data(where: Layout) -> data_lib.PreparedData:
    return data_lib.load_prepared(where.prepared, where.split)


def split(params: dict, dataset: str) -> dict:
    """One data set of the grid: its source, minus the deletion list, split into train/val/test."""
    return data_lib.split(dataset_params(params, dataset), SPLIT / dataset)


def prepare(params: dict, setting: str | None = None) -> dict:
    """The forget set of a setting, chosen from its data set's train split (flat: split and forget set in one)."""
    p, where = _params_of(params, setting)
    with tracking.stage_run(params, "prepare", {"setting": setting or "", **{k: p[k] for k in ("data", "forget")}},
                            run_name="prepare" if setting is None else f"prepare-{setting}") as (mlflow, _):
        if setting is None:
            summary = data_lib.prepare(p, where.prepared)
        else:
            summary = data_lib.choose_forget(p, where.split, where.prepared)
        write_json(where.metrics / "prepare.json", summary)
        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(where.prepared / "samples.csv"))
    return summary


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_inputs(params: dict, setting: str) -> dict:
    """models/<setting>/inputs.json: the hashes of the split and the target that the setting's
    unlearning runs read. DVC's matrix stages (setting x method) cannot name a setting's data set,
    so they depend on this file, which changes exactly when those inputs do."""
    where = layout(params, setting)
    files = [where.split / "images.pt", where.split / "samples.csv", where.target / "models.pt"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found (run the split and train_target stages first)")
    inputs = {"dataset": dataset_of(params, setting), "md5": {str(f): _md5(f) for f in files}}
    write_json(MODELS / setting / "inputs.json", inputs)
    return inputs


def _train_stage(params: dict, where: Layout, name: str, out_dir: Path, split_name: str, seed_list: list[int],
                 metrics_path: Path, register: bool, run_name: str) -> dict:
    """Train `seed_list`'s models on `split_name`; save them with their logits; with `register`, log
    the model to MLflow and make it the first champion of the deletion flow."""
    from unlearnops import evaluation, registry
    from unlearnops.config import build_dataclass
    from unlearnops.nets import model_spec
    from unlearnops.outputs import eval_parts, run_outputs
    from unlearnops.training import FitConfig, Runtime, Stream, train_from_scratch

    runtime = Runtime.from_params(params)
    data = _load_data(where)
    spec = model_spec(params, data.num_classes, data.in_channels, data.image_size)
    logged = {"model": params["model"], "train": params["train"], "n_models": len(seed_list)}
    with tracking.stage_run(params, name, logged, run_name=run_name, spool=not register) as (mlflow, run):
        fit = build_dataclass(FitConfig, params["train"]["fit"], "train.fit")
        stream = Stream(data[split_name].x, data[split_name].y, params["train"]["fit"]["batch_size"], bool(params["train"]["augment"]))
        stack, wall = train_from_scratch(spec, seed_list, stream, fit, runtime, desc=name)
        out_dir.mkdir(parents=True, exist_ok=True)
        stack.save(out_dir / "models.pt")
        parts = eval_parts(data, params["evaluate"]["retain_max_samples"], params["evaluate"]["seed"])
        outputs = run_outputs(stack, parts, runtime, wall)
        outputs.save(out_dir / "logits.npz")
        summary = {"n_models": stack.n, "accuracy": evaluation.accuracy_summary(outputs), "seconds_per_model": wall / stack.n, "wall_seconds": wall}
        write_json(metrics_path, summary)
        mlflow.log_metrics(tracking.flatten({"accuracy": summary["accuracy"]}) | {"seconds_per_model": wall / stack.n, "wall_seconds": wall})
        mlflow.set_tag("unlearnops.models", str(out_dir / "models.pt"))  # the weights are DVC's output
        if register:  # the one model the deletion flow starts from gets an MLflow model and a registry version
            tracking.log_model(mlflow, stack.module(0), data["test"].x[:2].numpy())
            accuracy = {f"{s}_accuracy": float(outputs.accuracy(s)[0]) for s in ("val", "test")}
            files = [where.split / "images.pt", where.prepared / "samples.csv", Path(params["data"]["deleted"])]
            registry.register_first_champion(mlflow, run, params, stack, data["test"].x, accuracy, files)
    return summary


def train_target(params: dict, dataset: str | None = None) -> dict:
    """The model in production: trained once per data set on its whole train split (retain + forget).

    The target of `ops.benchmark_setting`'s data set (flat: the only one) becomes the first
    `champion` of the registered model (params ops.model_name) if that has none yet; later
    champions come from reviewed deletion runs."""
    if dataset is None:
        p, where, register = params, FLAT, True
    else:
        p, where, register = dataset_params(params, dataset), dataset_layout(dataset), dataset == ops_dataset(params)
    return _train_stage(p, where, "target", where.target, "train", [int(p["train"]["seed"])], where.target_metrics, register,
                        "target" if dataset is None else f"target-{dataset}")


def retrain(params: dict, setting: str | None = None) -> dict:
    """The gold standard: N models trained from scratch on retain only, one seed each."""
    p, where = _params_of(params, setting)
    return _train_stage(p, where, "retrain", where.retrain, "retain", seeds(int(p["retrain"]["seed"]), int(p["n_models"])),
                        where.metrics / "retrain.json", False, "retrain" if setting is None else f"retrain-{setting}")


def run_name(method_name: str, condense: str | None) -> str:
    """Folder and metrics name of a run: the method, or `<method>+<condenser>` on a condensed retain set."""
    from unlearnops import condense as condense_lib

    if condense is None:
        return method_name
    return f"{method_name}+{choose(condense, condense_lib.CONDENSERS, 'condenser')}"


def run_names(params: dict) -> list[str]:
    """Every unlearning run of the benchmark: each method, then each method on the Blend-condensed retain set."""
    return [*params["unlearn"]["methods"], *(f"{m}+blend" for m in params.get("condense", {}).get("methods", []))]


def _suffix(setting: str | None, name: str) -> str:
    return name if setting is None else f"{setting}-{name}"


def unlearn(params: dict, method_name: str, setting: str | None = None, condense: str | None = None) -> dict:
    """Run `method_name` N times from the one target model, one seed per run; with `condense`
    (a condenser of unlearnops.condense) on the condensed retain set, condensing included in the time."""
    from unlearnops import methods
    from unlearnops.outputs import eval_parts, run_outputs
    from unlearnops.stack import ModelStack
    from unlearnops.training import Runtime

    p, where = _params_of(params, setting)
    runtime = Runtime.from_params(p)
    method = methods.get_method(method_name, p)
    name = run_name(method_name, condense)
    data = _load_data(where)
    target = ModelStack.load(where.target / "models.pt")
    retain = data["retain"]
    logged = {"setting": setting or "", "method": method_name, "hparams": p["methods"][method_name], "n_models": p["n_models"]}
    if condense is not None:
        logged["condense"] = {"name": condense, **p.get("condense", {}).get(condense, {})}
    with tracking.stage_run(params, "unlearn", logged, run_name=f"unlearn-{_suffix(setting, name)}") as (mlflow, _):
        start = time.perf_counter()
        if condense is not None:
            from unlearnops import condense as condense_lib

            condensed = condense_lib.condense(condense, p, retain, data["forget"], target, runtime)
            retain = condensed.retain
            sizes = {"retain_before": len(data["retain"]), "retain_after": len(retain), "kept": condensed.n_kept, "blended": condensed.n_blended}
        unlearn_data = methods.UnlearnData(retain, data["forget"], data["val"], data.num_classes, bool(p["train"]["augment"]))
        stack = method.unlearn(ModelStack.replicate(target, seeds(int(p["unlearn"]["seed"]), int(p["n_models"]))), unlearn_data, runtime)
        wall = time.perf_counter() - start
        out_dir = where.unlearned / name
        out_dir.mkdir(parents=True, exist_ok=True)
        stack.save(out_dir / "models.pt")
        parts = eval_parts(data, p["evaluate"]["retain_max_samples"], p["evaluate"]["seed"])
        run_outputs(stack, parts, runtime, wall).save(out_dir / "logits.npz")
        mlflow.log_metrics({"seconds_per_model": wall / stack.n, "wall_seconds": wall})
        mlflow.set_tag("unlearnops.models", str(out_dir / "models.pt"))  # the weights are DVC's output
        if condense is not None:
            write_json(out_dir / "condense.json", sizes)
            mlflow.log_metrics({f"condense_{k}": v for k, v in sizes.items()})
    return {"seconds_per_model": wall / stack.n}


def evaluate_retrain(params: dict, setting: str | None = None) -> dict:
    """The retrained models' own evidence, computed once for every `evaluate` to compare with:
    their membership inference and the relearning attack on them."""
    from unlearnops import evaluation
    from unlearnops.outputs import RunOutputs

    p, where = _params_of(params, setting)
    retrained = RunOutputs.load(where.retrain / "logits.npz")
    logged = {"setting": setting or "", "method": "retrain", "evaluate": p["evaluate"], "relearn": p["relearn"]}
    with tracking.stage_run(params, "evaluate", logged, run_name=f"evaluate-{_suffix(setting, 'retrain')}") as (mlflow, _):
        mia = evaluation.membership_inference(retrained, evaluation.eval_config(p))
        write_json(where.retrain_mia, mia)
        mlflow.log_metrics(tracking.flatten({"mia": mia}))
        relearn = _relearning_attack(p, where, "retrain", where.retrain / "models.pt", None, mlflow)
    return {"mia": mia, "relearn": relearn}


def headline(result: dict, relearn: dict) -> dict:
    """The few numbers of one run that `dvc metrics show` lists: Final with its interval, F,
    accuracies, time, the loss attack and the relearning attack's mean gap to retraining."""
    final = result["final_score"]
    gaps = [entry["gap_to_retrain"] for entry in relearn["subsets"].values() if "gap_to_retrain" in entry]
    return {
        "final": final["estimate"], "final_low": final["low"], "final_high": final["high"],
        "forget_quality": result["forget_quality"]["estimate"],
        **{f"{s}_acc": result["accuracy"][s]["mean"] for s in ("test", "retain", "forget")},
        "seconds_per_model": result["seconds_per_model"], "time_vs_retrain": result["time_vs_retrain"],
        "mia_loss_acc": result["mia"]["loss_attack_acc"],
        "relearn_gap": sum(gaps) / len(gaps) if gaps else None,
    }


def evaluate(params: dict, method_name: str, setting: str | None = None, condense: str | None = None) -> dict:
    """The evidence for one unlearning run, against retrain's: accuracies, the competition score,
    membership inference (evaluation.evaluate_method) and the relearning attack, in one MLflow run."""
    import numpy as np

    from unlearnops import evaluation, methods
    from unlearnops.outputs import RunOutputs

    p, where = _params_of(params, setting)
    methods.get_method(method_name, p)  # unknown names fail with the allowed list
    name = run_name(method_name, condense)
    unlearned = RunOutputs.load(where.unlearned / name / "logits.npz")
    retrained = RunOutputs.load(where.retrain / "logits.npz")
    retrain_mia = _read_json(where.retrain_mia, setting)
    retrain_relearn = _read_json(where.relearn / "relearn" / "retrain.json", setting)
    logged = {"setting": setting or "", "method": name, "evaluate": p["evaluate"], "relearn": p["relearn"]}
    with tracking.stage_run(params, "evaluate", logged, run_name=f"evaluate-{_suffix(setting, name)}") as (mlflow, _):
        metrics, arrays = evaluation.evaluate_method(unlearned, retrained, retrain_mia, p)
        result = {"method": name, **metrics}
        if condense is not None:  # the retain-set sizes before and after condensing
            result["condense"] = json.loads((where.unlearned / name / "condense.json").read_text())
        where.arrays.mkdir(parents=True, exist_ok=True)
        np.savez(where.arrays / f"{name}.npz", **arrays)
        write_json(where.evidence / f"{name}.json", result)
        mlflow.log_metrics({k: v for k, v in tracking.flatten(result).items() if isinstance(v, (int, float))})
        relearn = _relearning_attack(p, where, name, where.unlearned / name / "models.pt", retrain_relearn, mlflow)
        if where.headlines:
            write_json(where.metrics / f"{name}.json", headline(result, relearn))
    return result


def _relearning_attack(params: dict, where: Layout, name: str, checkpoint: Path, retrain_result: dict | None, mlflow) -> dict:
    """Attack the first relearn.n_models models of `checkpoint`; write relearn/<name>.json
    (with retrain's result as the reference, if given) and log it to the open MLflow run."""
    from unlearnops.metrics import relearn as relearn_lib
    from unlearnops.stack import ModelStack
    from unlearnops.training import Runtime

    cfg = relearn_lib.config_from(params)
    stack = ModelStack.load(checkpoint)
    forget = _load_data(where)["forget"]
    result = relearn_lib.relearning_attack(stack, forget, cfg, Runtime.from_params(params))
    if retrain_result is not None:
        result = relearn_lib.with_retrain_reference(result, retrain_result)
    result = {"name": name, **result}
    write_json(where.relearn / "relearn" / f"{name}.json", result)
    mlflow.log_metrics({k: v for k, v in tracking.flatten(result["subsets"], "relearn.").items() if isinstance(v, (int, float))})
    for key, entry in result["subsets"].items():
        for epoch, accuracy in enumerate(entry["per_epoch"]):
            mlflow.log_metric(f"relearn.{key}.accuracy_on_T", accuracy, step=epoch)
    return result


def _read_json(path: Path, setting: str | None) -> dict:
    if not path.is_file():
        stage = "evaluate_retrain" if setting is None else f"retrain@{setting}"
        raise FileNotFoundError(f"{path} not found (run the {stage} stage first)")
    return json.loads(path.read_text())


def report(params: dict, grid: bool = False) -> dict:
    """The report: with `grid`, of every setting in params.yaml; else of the flat layout's one run."""
    from unlearnops import report as report_lib

    chosen = {name: (setting_params(params, name), layout(params, name)) for name in settings(params)} if grid \
        else {report_lib.setting_label(params): (params, FLAT)}
    with tracking.stage_run(params, "report", {"methods": params["unlearn"]["methods"], "settings": list(chosen)}) as (mlflow, _):
        written = report_lib.build(params, chosen, REPORTS)
        for path in written:
            mlflow.log_artifact(str(path))
    return {"files": [str(p) for p in written]}
