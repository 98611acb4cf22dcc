"""The DVC stages' work: read params and inputs, call the library, write outputs, log to MLflow.

Each function is one step of dvc.yaml; `stages/<name>.py` only calls it. Where each setting's files
live is unlearnops.layout. Every stage is a fresh process, so MLflow, scikit-learn, the registry and
the methods are imported only in the functions that use them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from unlearnops import data as data_lib
from unlearnops import tracking
from unlearnops.config import choose
from unlearnops.files import file_md5, savez, write_json
from unlearnops.layout import (FLAT, MODELS, REPORTS, SPLIT, SUMMARY, Layout, dataset_layout, dataset_of, dataset_params,
                               ops_dataset, setting_layout, setting_params, settings)


# ---------------------------------------------------------------- stages


def _params_of(params: dict, setting: str | None) -> tuple[dict, Layout]:
    return (params if setting is None else setting_params(params, setting)), setting_layout(params, setting)


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


def record_inputs(params: dict, setting: str) -> dict:
    """models/<setting>/inputs.json: the hashes of the split and the target that the setting's
    unlearning runs read. DVC's matrix stages (setting x method) cannot name a setting's data set,
    so they depend on this file, which changes exactly when those inputs do."""
    where = setting_layout(params, setting)
    files = [where.split / "images.pt", where.split / "samples.csv", where.target / "models.pt"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found (run the split and train_target stages first)")
    inputs = {"dataset": dataset_of(params, setting), "md5": {str(f): file_md5(f) for f in files}}
    write_json(MODELS / setting / "inputs.json", inputs)
    return inputs


def _train_stage(params: dict, where: Layout, name: str, out_dir: Path, n_models: int, compute, metrics_path: Path, register: bool,
                 run_name: str) -> dict:
    """Train `n_models` models with `compute()` -> (ModelStack, RunOutputs); save them with their
    logits; with `register`, log the model to MLflow and make it the first champion of the deletion flow."""
    from unlearnops import evaluation
    from unlearnops.ops import model_registry

    logged = {"model": params["model"], "train": params["train"], "n_models": n_models}
    with tracking.stage_run(params, name, logged, run_name=run_name, spool=not register) as (mlflow, run):
        stack, outputs = compute()
        wall = outputs.wall_seconds
        out_dir.mkdir(parents=True, exist_ok=True)
        stack.save(out_dir / "models.pt")
        outputs.save(out_dir / "logits.npz")
        summary = {"n_models": stack.n, "accuracy": evaluation.accuracy_summary(outputs), "seconds_per_model": wall / stack.n, "wall_seconds": wall}
        write_json(metrics_path, summary)
        mlflow.log_metrics(tracking.flatten({"accuracy": summary["accuracy"]}) | {"seconds_per_model": wall / stack.n, "wall_seconds": wall})
        mlflow.set_tag("unlearnops.models", str(out_dir / "models.pt"))  # the weights are DVC's output
        if register:  # the one model the deletion flow starts from gets an MLflow model and a registry version
            data = _load_data(where)
            tracking.log_model(mlflow, stack.module(0), data["test"].x[:2].numpy())
            accuracy = {f"{s}_accuracy": float(outputs.accuracy(s)[0]) for s in ("val", "test")}
            files = [where.split / "images.pt", where.prepared / "samples.csv", Path(params["data"]["deleted"])]
            model_registry.register_first_champion(mlflow, run, params, stack, data["test"].x, accuracy, files)
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
    from unlearnops.chunks import trained
    from unlearnops.training import Runtime

    def compute():
        return trained(p, _load_data(where), "train", [int(p["train"]["seed"])], Runtime.from_params(p), desc="target")

    return _train_stage(p, where, "target", where.target, 1, compute, where.target_metrics, register,
                        "target" if dataset is None else f"target-{dataset}")


def retrain(params: dict, setting: str | None = None) -> dict:
    """The gold standard: N models trained from scratch on retain only, one seed each, in chunks
    of runtime.chunk_models through the store runtime.store (unlearnops/chunks.py)."""
    from unlearnops import chunks

    p, where = _params_of(params, setting)
    return _train_stage(p, where, "retrain", where.retrain, int(p["n_models"]),
                        lambda: chunks.assemble(params, setting, "retrain", store=chunks.store_of(params)),
                        where.metrics / "retrain.json", False, "retrain" if setting is None else f"retrain-{setting}")


def run_name(method_name: str, condense: str | None) -> str:
    """Folder and metrics name of a run: the method, or `<method>+<condenser>` on a condensed retain set."""
    if condense is None:
        return method_name
    from unlearnops import condense as condense_lib  # only on a condensed run (tests/test_dvc_deps.py OPTIONAL)

    return f"{method_name}+{choose(condense, condense_lib.CONDENSERS, 'condenser')}"


def _suffix(setting: str | None, name: str) -> str:
    return name if setting is None else f"{setting}-{name}"


def unlearn(params: dict, method_name: str, setting: str | None = None, condense: str | None = None) -> dict:
    """Run `method_name` N times from the one target model, one seed per run; with `condense`
    (a condenser of unlearnops.condense) on the condensed retain set, condensing included in the time.
    The runs are computed in chunks of runtime.chunk_models through the store runtime.store
    (unlearnops/chunks.py: what the store holds is not recomputed)."""
    from unlearnops import chunks, methods

    p, where = _params_of(params, setting)
    methods.get_method(method_name, p)  # unknown names fail with the allowed list, before any work
    name = run_name(method_name, condense)
    logged = {"setting": setting or "", "method": method_name, "hparams": p["methods"][method_name], "n_models": p["n_models"]}
    if condense is not None:
        logged["condense"] = {"name": condense, **p.get("condense", {}).get(condense, {})}
    with tracking.stage_run(params, "unlearn", logged, run_name=f"unlearn-{_suffix(setting, name)}") as (mlflow, _):
        stack, outputs, metas = chunks.assemble_with_meta(params, setting, "unlearn", method_name, condense, chunks.store_of(params))
        wall = outputs.wall_seconds
        out_dir = where.unlearned / name
        out_dir.mkdir(parents=True, exist_ok=True)
        stack.save(out_dir / "models.pt")
        outputs.save(out_dir / "logits.npz")
        mlflow.log_metrics({"seconds_per_model": wall / stack.n, "wall_seconds": wall})
        mlflow.set_tag("unlearnops.models", str(out_dir / "models.pt"))  # the weights are DVC's output
        if condense is not None:  # every chunk condensed the same retain set
            sizes = metas[0]["condense"]
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
        savez(where.arrays / f"{name}.npz", **arrays)
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

    chosen = {name: (setting_params(params, name), setting_layout(params, name)) for name in settings(params)} if grid \
        else {report_lib.setting_label(params): (params, FLAT)}
    with tracking.stage_run(params, "report", {"methods": params["unlearn"]["methods"], "settings": list(chosen)}) as (mlflow, _):
        written = report_lib.build(params, chosen, REPORTS, SUMMARY if grid else None)
        for path in written:
            mlflow.log_artifact(str(path))
    return {"files": [str(p) for p in written]}


def ulira(params: dict, setting: str) -> dict:
    """U-LiRA on one setting (unlearnops.ulira): K shadow targets on halves of a pool of forget
    examples, every run of `run_names` unlearning each, retrain and the shadow targets as
    references; evaluation/<setting>/ulira.json (metrics) and ulira.npz (per-example scores)."""
    from unlearnops import methods, progress
    from unlearnops import ulira as ulira_lib
    from unlearnops.config import build_dataclass
    from unlearnops.layout import run_names
    from unlearnops.nets import model_spec
    from unlearnops.stack import ModelStack
    from unlearnops.training import FitConfig, Runtime

    p, where = _params_of(params, setting)
    cfg = ulira_lib.config_from(p)
    runtime = Runtime.from_params(p)
    data = _load_data(where)
    retain, forget = data["retain"], data["forget"]
    augment = bool(p["train"]["augment"])
    splits = ulira_lib.choose_splits(len(forget), cfg)
    logged = {"setting": setting, "ulira": p["evaluate"]["ulira"], "pool": len(splits.pool)}
    with tracking.stage_run(params, "ulira", logged, run_name=f"ulira-{setting}") as (mlflow, _):
        start = time.perf_counter()
        spec = model_spec(p, data.num_classes, data.in_channels, data.image_size)
        fit = build_dataclass(FitConfig, p["train"]["fit"], "train.fit")
        shadows = ulira_lib.train_shadows(spec, retain, forget, splits, cfg, fit, runtime, augment)
        results, arrays, seconds = {}, {}, {"shadows": time.perf_counter() - start}

        def record(name: str, stack: ModelStack, per_split: int | None) -> None:
            split, member = ulira_lib.runs_of_splits(stack.n, splits, per_split)
            results[name], named = ulira_lib.attack(ulira_lib.confidences(stack, forget, splits, runtime), split, member, cfg)
            arrays.update({f"{name}/{key}": value for key, value in named.items()})

        record("original", shadows, 1)
        retrained = ModelStack.load(where.retrain / "models.pt")  # as many runs per split as the methods have, where N allows
        record("retrain", retrained.select(list(range(min(retrained.n, splits.k * cfg.runs_per_split)))), None)
        for name in progress.bar(run_names(p), desc=f"ulira {setting}: runs"):
            began = time.perf_counter()
            method_name, _, condenser = name.partition("+")
            method = methods.get_method(method_name, p)

            def unlearn_one(originals: ModelStack, forget_k, method=method, condenser=condenser):
                kept = retain
                if condenser:
                    from unlearnops import condense as condense_lib

                    kept = condense_lib.condense(condenser, p, retain, forget_k, originals.select([0]), runtime).retain
                return method.unlearn(originals, methods.UnlearnData(kept, forget_k, data["val"], data.num_classes, augment), runtime)

            record(name, ulira_lib.unlearn_shadows(unlearn_one, shadows, forget, splits, cfg), cfg.runs_per_split)
            seconds[name] = time.perf_counter() - began
        seconds["total"] = time.perf_counter() - start
        summary = {
            "setting": setting, "splits": splits.k, "runs_per_split": cfg.runs_per_split, "pool": len(splits.pool),
            "pool_ids": [str(i) for i in forget.ids[splits.pool]], "fixed_variance": cfg.fixed_variance,
            "note": "in = trained on the example then unlearned, out = never trained on it; Gaussians fit leaving the scored run's split out. "
                    "TPR at 0.1% FPR needs >= 1000 out pairs (n_out); every figure depends on splits, runs_per_split and pool.",
            "runs": results, "seconds": seconds,
        }
        where.evidence.mkdir(parents=True, exist_ok=True)
        write_json(where.evidence / "ulira.json", summary, sort_keys=False)
        savez(where.evidence / "ulira.npz", pool_ids=forget.ids[splits.pool].astype(str), **arrays)
        mlflow.log_metrics({f"ulira.{name.replace('+', '_')}.{k}": v for name, r in results.items() for k, v in r.items()  # MLflow names take no '+'
                            if isinstance(v, (int, float))})
        mlflow.log_metrics({f"ulira.seconds.{k.replace('+', '_')}": v for k, v in seconds.items()})
    return summary
