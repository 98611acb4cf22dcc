"""The DVC stages' work: read params and inputs, call the library, write outputs, log to MLflow.

Each function is one stage of dvc.yaml; `stages/<name>.py` only calls it. The paths here are
the ones dvc.yaml declares as deps and outs. Every stage is a fresh process, so modules that
pull in scikit-learn (evaluation) are imported only by the stages that use them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from unlearnops import condense as condense_lib
from unlearnops import data as data_lib
from unlearnops import methods, registry, tracking
from unlearnops.config import build_dataclass, choose
from unlearnops.files import write_json
from unlearnops.nets import model_spec
from unlearnops.outputs import RunOutputs, eval_parts, run_outputs
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, Runtime, Stream, train_from_scratch

PREPARED = Path("data/prepared")
TARGET = Path("models/target")
RETRAIN = Path("models/retrain")
UNLEARNED = Path("models/unlearned")
METRICS = Path("metrics")
EVALUATION = Path("evaluation")
RETRAIN_MIA = METRICS / "retrain_mia.json"  # the evaluate_retrain stage: retrain's membership inference
REPORTS = Path("reports")


def seeds(base: int, n: int) -> list[int]:
    return [base + i for i in range(n)]


def _fit_config(params: dict) -> FitConfig:
    return build_dataclass(FitConfig, params["train"]["fit"], "train.fit")


def _input_example(data: data_lib.PreparedData) -> np.ndarray:
    return data["test"].x[:2].numpy()


def prepare(params: dict) -> dict:
    with tracking.stage_run(params, "prepare", {k: params[k] for k in ("data", "forget")}) as (mlflow, _):
        summary = data_lib.prepare(params, PREPARED)
        write_json(METRICS / "prepare.json", summary)
        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(PREPARED / "samples.csv"))
    return summary


def _train_stage(params: dict, name: str, out_dir: Path, split: str, seed_list: list[int], register: bool = False) -> dict:
    from unlearnops import evaluation

    runtime = Runtime.from_params(params)
    data = data_lib.load_prepared(PREPARED)
    spec = model_spec(params, data.num_classes, data.in_channels, data.image_size)
    logged = {"model": params["model"], "train": params["train"], "n_models": len(seed_list)}
    with tracking.stage_run(params, name, logged) as (mlflow, run):
        stream = Stream(data[split].x, data[split].y, params["train"]["fit"]["batch_size"], bool(params["train"]["augment"]))
        stack, wall = train_from_scratch(spec, seed_list, stream, _fit_config(params), runtime, desc=name)
        out_dir.mkdir(parents=True, exist_ok=True)
        stack.save(out_dir / "models.pt")
        parts = eval_parts(data, params["evaluate"]["retain_max_samples"], params["evaluate"]["seed"])
        outputs = run_outputs(stack, parts, runtime, wall)
        outputs.save(out_dir / "logits.npz")
        summary = {"n_models": stack.n, "accuracy": evaluation.accuracy_summary(outputs), "seconds_per_model": wall / stack.n, "wall_seconds": wall}
        write_json(METRICS / f"{name}.json", summary)
        mlflow.log_metrics(tracking.flatten({"accuracy": summary["accuracy"]}) | {"seconds_per_model": wall / stack.n, "wall_seconds": wall})
        tracking.log_model(mlflow, stack.module(0), _input_example(data))
        if register:
            accuracy = {f"{s}_accuracy": float(outputs.accuracy(s)[0]) for s in ("val", "test")}
            files = [PREPARED / "images.pt", PREPARED / "samples.csv", Path(params["data"]["deleted"])]
            registry.register_first_champion(mlflow, run, params, stack, data["test"].x, accuracy, files)
    return summary


def train_target(params: dict) -> dict:
    """The model in production: trained once on the whole train split (retain + forget).

    It becomes the first `champion` of the registered model (params ops.model_name) if that
    has none yet; later champions come from reviewed deletion runs."""
    return _train_stage(params, "target", TARGET, "train", [int(params["train"]["seed"])], register=True)


def retrain(params: dict) -> dict:
    """The gold standard: N models trained from scratch on retain only, one seed each."""
    return _train_stage(params, "retrain", RETRAIN, "retain", seeds(int(params["retrain"]["seed"]), int(params["n_models"])))


def run_name(method_name: str, condense: str | None) -> str:
    """Folder and metrics name of a run: the method, or `<method>+<condenser>` on a condensed retain set."""
    if condense is None:
        return method_name
    return f"{method_name}+{choose(condense, condense_lib.CONDENSERS, 'condenser')}"


def run_names(params: dict) -> list[str]:
    """Every unlearning run of the benchmark: each method, then each method on the Blend-condensed retain set."""
    return [*params["unlearn"]["methods"], *(run_name(m, "blend") for m in params.get("condense", {}).get("methods", []))]


def unlearn(params: dict, method_name: str, condense: str | None = None) -> dict:
    """Run `method_name` N times from the one target model, one seed per run; with `condense`
    (a condenser of unlearnops.condense) on the condensed retain set, condensing included in the time."""
    runtime = Runtime.from_params(params)
    method = methods.get_method(method_name, params)
    name = run_name(method_name, condense)
    data = data_lib.load_prepared(PREPARED)
    target = ModelStack.load(TARGET / "models.pt")
    retain = data["retain"]
    logged = {"method": method_name, "hparams": params["methods"][method_name], "n_models": params["n_models"]}
    if condense is not None:
        logged["condense"] = {"name": condense, **params.get("condense", {}).get(condense, {})}
    with tracking.stage_run(params, "unlearn", logged, run_name=f"unlearn-{name}") as (mlflow, _):
        start = time.perf_counter()
        if condense is not None:
            condensed = condense_lib.condense(condense, params, retain, data["forget"], target, runtime)
            retain = condensed.retain
            sizes = {"retain_before": len(data["retain"]), "retain_after": len(retain), "kept": condensed.n_kept, "blended": condensed.n_blended}
        unlearn_data = methods.UnlearnData(retain, data["forget"], data["val"], data.num_classes, bool(params["train"]["augment"]))
        stack = method.unlearn(ModelStack.replicate(target, seeds(int(params["unlearn"]["seed"]), int(params["n_models"]))), unlearn_data, runtime)
        wall = time.perf_counter() - start
        out_dir = UNLEARNED / name
        out_dir.mkdir(parents=True, exist_ok=True)
        stack.save(out_dir / "models.pt")
        parts = eval_parts(data, params["evaluate"]["retain_max_samples"], params["evaluate"]["seed"])
        run_outputs(stack, parts, runtime, wall).save(out_dir / "logits.npz")
        mlflow.log_metrics({"seconds_per_model": wall / stack.n, "wall_seconds": wall})
        if condense is not None:
            write_json(out_dir / "condense.json", sizes)
            mlflow.log_metrics({f"condense_{k}": v for k, v in sizes.items()})
        tracking.log_model(mlflow, stack.module(0), _input_example(data))
    return {"seconds_per_model": wall / stack.n}


def evaluate_retrain(params: dict) -> dict:
    """The retrained models' own evidence, computed once for every `evaluate` stage to compare
    with: their membership inference and the relearning attack on them."""
    from unlearnops import evaluation

    retrained = RunOutputs.load(RETRAIN / "logits.npz")
    logged = {"method": "retrain", "evaluate": params["evaluate"], "relearn": params["relearn"]}
    with tracking.stage_run(params, "evaluate", logged, run_name="evaluate-retrain") as (mlflow, _):
        mia = evaluation.membership_inference(retrained, evaluation.eval_config(params))
        write_json(RETRAIN_MIA, mia)
        mlflow.log_metrics(tracking.flatten({"mia": mia}))
        relearn = _relearning_attack(params, "retrain", RETRAIN / "models.pt", None, mlflow)
    return {"mia": mia, "relearn": relearn}


def evaluate(params: dict, method_name: str, condense: str | None = None) -> dict:
    """The evidence for one unlearning run, against retrain's: accuracies, the competition score,
    membership inference (evaluation.evaluate_method) and the relearning attack, in one MLflow run."""
    from unlearnops import evaluation

    methods.get_method(method_name, params)  # unknown names fail with the allowed list
    name = run_name(method_name, condense)
    unlearned = RunOutputs.load(UNLEARNED / name / "logits.npz")
    retrained = RunOutputs.load(RETRAIN / "logits.npz")
    retrain_mia = _read_json(RETRAIN_MIA, "evaluate_retrain")
    retrain_relearn = _read_json(METRICS / "relearn" / "retrain.json", "evaluate_retrain")
    with tracking.stage_run(params, "evaluate", {"method": name, "evaluate": params["evaluate"], "relearn": params["relearn"]}, run_name=f"evaluate-{name}") as (mlflow, _):
        metrics, arrays = evaluation.evaluate_method(unlearned, retrained, retrain_mia, params)
        result = {"method": name, **metrics}
        if condense is not None:  # the retain-set sizes before and after condensing
            result["condense"] = json.loads((UNLEARNED / name / "condense.json").read_text())
        EVALUATION.mkdir(exist_ok=True)
        np.savez(EVALUATION / f"{name}.npz", **arrays)
        write_json(METRICS / "methods" / f"{name}.json", result)
        mlflow.log_metrics({k: v for k, v in tracking.flatten(result).items() if isinstance(v, (int, float))})
        _relearning_attack(params, name, UNLEARNED / name / "models.pt", retrain_relearn, mlflow)
    return result


def _relearning_attack(params: dict, name: str, checkpoint: Path, retrain_result: dict | None, mlflow) -> dict:
    """Attack the first relearn.n_models models of `checkpoint`; write metrics/relearn/<name>.json
    (with retrain's result as the reference, if given) and log it to the open MLflow run."""
    from unlearnops.metrics import relearn as relearn_lib

    cfg = relearn_lib.config_from(params)
    stack = ModelStack.load(checkpoint)
    forget = data_lib.load_prepared(PREPARED)["forget"]
    result = relearn_lib.relearning_attack(stack, forget, cfg, Runtime.from_params(params))
    if retrain_result is not None:
        result = relearn_lib.with_retrain_reference(result, retrain_result)
    result = {"name": name, **result}
    write_json(METRICS / "relearn" / f"{name}.json", result)
    mlflow.log_metrics({k: v for k, v in tracking.flatten(result["subsets"], "relearn.").items() if isinstance(v, (int, float))})
    for key, entry in result["subsets"].items():
        for epoch, accuracy in enumerate(entry["per_epoch"]):
            mlflow.log_metric(f"relearn.{key}.accuracy_on_T", accuracy, step=epoch)
    return result


def _read_json(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (run the {stage} stage first)")
    return json.loads(path.read_text())


def report(params: dict) -> dict:
    from unlearnops import report as report_lib

    with tracking.stage_run(params, "report", {"methods": params["unlearn"]["methods"]}) as (mlflow, _):
        written = report_lib.build(params, METRICS, REPORTS, Path("models"))
        for path in written:
            mlflow.log_artifact(str(path))
    return {"files": [str(p) for p in written]}
