"""`unlearnops tune <method>`: an Optuna search over one method's hyperparameters, on the validation side.

The seed study tuned only the fine-tuning hyperparameters of each method, to keep the comparison
fair; params.yaml `tune.spaces.<method>` holds such a space per method (dotted keys under
`methods.<method>`, each a range `{low, high, log}` or `{choices: [...]}`); users may widen it.

Objective: the competition's Final (metrics/epsilon.py) with VALIDATION accuracy in place of test
accuracy: F of the forget set against the setting's retrained models, x retain-accuracy ratio, x
validation-accuracy ratio, all against retrain's logits (models/<setting>/retrain/logits.npz). The
test split is never read: `ValidationSide` keeps only the retain, forget and validation parts of
the prepared data and reads only those arrays of retrain's logits. A trial runs `tune.n_models`
unlearning runs (seeds unlearn.seed + i, as the pipeline's first runs); F, and so Final, depends
on the number of models (more models, stronger attacks): compare figures at the same n_models.

Pruning: the runs go in `tune.chunks` equal chunks; after each, Final of the runs so far is the
trial's intermediate value at step k (every trial is scored with the same number of models at a
step, so steps compare), and Optuna's MedianPruner stops a trial below the median of earlier ones.
Per-epoch values would need a hook inside every method's training; model chunks need none.

Time budget: each trial records time per model / retrain's time per model (`time_vs_retrain`);
above `evaluate.time_budget` the trial is infeasible: the seeded TPE sampler gets it as a
constraint (`Trial.set_constraint`), and the best trial is the best feasible one. Retrain's time is
measured just before each trial (`measure_retrain_seconds`: one epoch of train.fit for a chunk's
number of models in one pass): the pipeline's stored time had all N models to a pass and another
load, so against it a trial's ratio came out 4-10x too high on a shared 2-core machine; measured
once per search, the ratio of one configuration still doubled as the machine's load drifted. On a
machine shared with other jobs the ratio stays noisy (the same configuration: 0.16 and 0.45 of
retraining beside each trial under a load of 8 on 2 cores; CPU time instead was no steadier): tune
where the pipeline's own times are measured, or widen the budget knowingly.

Crash safety: one SQLite study per (setting, method) in .optuna/<setting>/<method>.db (Optuna's
RDBStorage with a heartbeat): a trial left RUNNING by a killed process stops beating, is failed
once its heartbeat is `tune.grace_seconds` old, and `RetryHeartbeatStaleTrialCallback` enqueues it again
with the same params. The study's name carries a hash of what its values depend on (setting,
n_models, seeds, space, the method's other hyperparameters, the target and retrain files), so a
changed setup starts a new study instead of mixing values. The trial with the method's current
params.yaml values is enqueued first, so "better than the defaults" is measured in the same study.

Outputs: tune/<setting>/<method>.json (every trial, the defaults' value, the best; the report's
sensitivity section reads it) and tune/<setting>/<method>.yaml (the best values in params.yaml's
shape); `--apply` writes them into params.yaml keeping its comments (ruamel, as `dvc exp run -S`),
and the equivalent `dvc exp run -S` command is printed. MLflow: one parent run per study (its id
kept in the study, so a resumed search continues it), one child run per trial.

Sources: Optuna's docs (RDBStorage heartbeat, RetryHeartbeatStaleTrialCallback, Trial.set_constraint,
MedianPruner); the competition's score as in docs/metric.md.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unlearnops import data as data_lib
from unlearnops.config import ConfigError, choose
from unlearnops.files import write_json, write_text_atomic
from unlearnops.layout import STUDIES, TUNE, dataset_of, seeds, setting_layout, setting_params

SPLITS = ("retain", "forget", "val")  # what a trial reads; never "test"


# ---------------------------------------------------------------- the validation side


@dataclass
class ValidationSide:
    """Everything a trial reads: the setting's params, retain/forget/val data, the target, retrain's logits on them."""

    params: dict
    parts: dict           # split -> data.Part, for SPLITS only; retain limited to the samples retrain's logits cover
    unlearn_data: object  # methods.UnlearnData (the full retain set, as the unlearn stage gives it)
    target: object        # stack.ModelStack
    retrained: dict       # split -> [N, n, C] logits, for SPLITS only
    labels: dict          # split -> [n]
    retrain_seconds_per_model: float  # the pipeline's; `tune` replaces it with one measured beside each trial


def _stage_hint(params: dict, setting: str) -> dict[str, str]:
    dataset = dataset_of(params, setting)
    return {"split": f"split@{dataset}", "target": f"train_target@{dataset}", "prepared": f"prepare@{setting}",
            "retrain": f"retrain@{setting}"}


def input_files(params: dict, setting: str) -> dict[str, Path]:
    where = setting_layout(params, setting)
    return {"split": where.split / "images.pt", "prepared": where.prepared / "samples.csv",
            "target": where.target / "models.pt", "retrain": where.retrain / "logits.npz"}


def load_validation_side(params: dict, setting: str) -> ValidationSide:
    """The setting's DVC outputs, minus everything about the test split (dropped on load, never passed on)."""
    from unlearnops.methods import UnlearnData
    from unlearnops.stack import ModelStack

    files, hints = input_files(params, setting), _stage_hint(params, setting)
    for key, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `dvc repro {hints[key]}` first")
    p = setting_params(params, setting)
    data = data_lib.load_prepared(files["prepared"].parent, files["split"].parent)
    parts = {s: data[s] for s in SPLITS}
    unlearn_data = UnlearnData(parts["retain"], parts["forget"], parts["val"], data.num_classes, bool(p["train"]["augment"]))
    with np.load(files["retrain"], allow_pickle=False) as blob:  # a lazy archive: only these arrays are read
        retrained = {s: blob[s] for s in SPLITS}
        labels = {s: blob[f"{s}_labels"] for s in SPLITS}
        ids = {s: blob[f"{s}_ids"] for s in SPLITS}
        seconds = float(np.mean(blob["seconds_per_model"]))
    for split in SPLITS:  # retain: the (possibly subsampled) samples retrain was scored on, in its order
        position = {sample: i for i, sample in enumerate(parts[split].ids)}
        missing = [sample for sample in ids[split] if sample not in position]
        if missing:
            raise ConfigError(f"{files['retrain']} does not match {files['prepared']} ({split}: {len(missing)} unknown sample ids); "
                              f"rerun `dvc repro {hints['retrain']}`")
        index = np.array([position[sample] for sample in ids[split]], dtype=np.int64)
        part = parts[split]
        parts[split] = type(part)(part.x[index], part.y[index], part.ids[index])
    return ValidationSide(p, parts, unlearn_data, ModelStack.load(files["target"]), retrained, labels, seconds)


def measure_retrain_seconds(side: ValidationSide, n_models: int) -> float:
    """Retraining's time per model, measured now and as a trial runs: one epoch of train.fit on retain for
    `n_models` models in one pass (a trial's chunk), times train.fit.epochs. The pipeline's stored time was
    measured with all N models to a pass and under another load, which would not compare."""
    from unlearnops.config import build_dataclass
    from unlearnops.training import FitConfig, Runtime, Stream, train_from_scratch

    fit = side.params["train"]["fit"]
    retain = side.unlearn_data.retain
    stream = Stream(retain.x, retain.y, int(fit["batch_size"]), side.unlearn_data.augment)
    one_epoch = build_dataclass(FitConfig, {**fit, "epochs": 1}, "train.fit")
    _, wall = train_from_scratch(side.target.spec, seeds(int(side.params["retrain"]["seed"]), n_models), stream, one_epoch,
                                 Runtime.from_params(side.params), desc="retrain timing")
    return wall / n_models * int(fit["epochs"])


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (logits.argmax(-1) == labels[None]).mean(axis=1)


def validation_final(logits: dict, side: ValidationSide) -> dict:
    """Final on the validation side of the first n unlearned vs the first n retrained models (n = models in `logits`)."""
    from unlearnops.metrics import epsilon

    n = logits["forget"].shape[0]
    conf_u = epsilon.logit_scaled_confidence(logits["forget"], side.labels["forget"])
    conf_r = epsilon.logit_scaled_confidence(side.retrained["forget"][:n], side.labels["forget"])
    forget_quality = epsilon.forget_quality(epsilon.per_example_epsilons(conf_u, conf_r), n)["forget_quality"]
    acc_u = {s: _accuracy(logits[s], side.labels[s]) for s in SPLITS}
    acc_r = {s: _accuracy(side.retrained[s][:n], side.labels[s]) for s in SPLITS}
    final = epsilon.final_score(forget_quality, acc_u["retain"], acc_r["retain"], acc_u["val"], acc_r["val"])
    return {"final_val": final, "forget_quality": forget_quality, "n_models": n,
            **{f"{s}_acc": float(acc_u[s].mean()) for s in SPLITS}}


def run_trial(side: ValidationSide, method_name: str, method_params: dict, n_models: int, chunks: int,
              report=None) -> dict:
    """`n_models` runs of the method with `method_params` (methods.<name>) in `chunks` chunks; after each but the
    last, `report(scores, step)` gets the scores and time of the runs so far (it may raise optuna.TrialPruned).
    Returns the scores and time of all runs."""
    from unlearnops import methods
    from unlearnops.stack import ModelStack
    from unlearnops.training import Runtime, predict

    params = copy.deepcopy(side.params)
    params["methods"][method_name] = method_params
    runtime = Runtime.from_params(params)
    method = methods.get_method(method_name, params)
    all_seeds = seeds(int(params["unlearn"]["seed"]), n_models)
    bounds = np.linspace(0, n_models, chunks + 1).round().astype(int)
    logits: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    seconds, scores = 0.0, {}
    for step, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        began = time.perf_counter()
        stack = method.unlearn(ModelStack.replicate(side.target, all_seeds[start:stop]), side.unlearn_data, runtime)
        seconds += time.perf_counter() - began
        for split in SPLITS:
            logits[split].append(predict(stack, side.parts[split].x, runtime).numpy())
        scores = validation_final({s: np.concatenate(v) for s, v in logits.items()}, side)
        scores |= {"seconds_per_model": seconds / stop, "time_vs_retrain": seconds / stop / side.retrain_seconds_per_model}
        if report is not None and step < chunks - 1:
            report(scores, step)
    return scores


# ---------------------------------------------------------------- spaces and params


def get_dotted(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        node = node[part]
    return node


def set_dotted(tree: dict, key: str, value) -> None:
    *head, last = key.split(".")
    node = tree
    for part in head:
        node = node[part]
    node[last] = value


def suggest(trial, key: str, spec: dict, default):
    """One hyperparameter: categorical for `choices`, else int when params.yaml's value is an int, else float."""
    if "choices" in spec:
        return trial.suggest_categorical(key, list(spec["choices"]))
    if isinstance(default, int) and not isinstance(default, bool):
        return trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)))
    return trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)))


def study_config(params: dict, method: str) -> tuple[str, dict, dict]:
    """(setting, space, defaults) of `method`'s study, checked: a registered method with a space in tune.spaces."""
    from unlearnops import methods

    choose(method, methods.available(), "method")
    cfg = params["tune"]
    space = (cfg.get("spaces") or {}).get(method)
    if not space:
        raise ConfigError(f"tune.spaces has no search space for method '{method}'; add tune.spaces.{method} "
                          f"(spaces exist for: {', '.join(sorted(cfg.get('spaces') or {}))})")
    setting = cfg.get("setting") or params["ops"]["benchmark_setting"]
    choose(setting, params.get("settings") or {}, "tune.setting (a setting of `settings`)")
    p = setting_params(params, setting)
    defaults = {key: get_dotted(p["methods"][method], key) for key in space}
    return setting, space, defaults


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(params: dict, method: str, setting: str, space: dict) -> str:
    """A hash of everything a trial's value depends on except the searched values themselves."""
    p = setting_params(params, setting)
    fixed = copy.deepcopy(p["methods"][method])
    for key in space:
        set_dotted(fixed, key, None)
    files = input_files(params, setting)
    what = {"setting": setting, "method": method, "space": space, "fixed": fixed, "n_models": params["tune"]["n_models"],
            "chunks": params["tune"]["chunks"], "seed": params["tune"]["seed"], "unlearn_seed": p["unlearn"]["seed"],
            "evaluate": {k: p["evaluate"][k] for k in ("retain_max_samples", "seed", "time_budget")},
            "files": {k: _md5(files[k]) for k in ("target", "retrain")}}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]


def best_params_yaml(method: str, best: dict, setting: str, value: float, defaults_value: float | None) -> str:
    import yaml

    tree: dict = {}
    for key, val in best.items():
        node = tree
        *head, last = key.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = val
    header = (f"# unlearnops tune {method}: the best feasible trial on {setting} (Final on the validation side {value:.4f}; "
              f"the defaults: {'-' if defaults_value is None else f'{defaults_value:.4f}'}).\n"
              f"# Overrides of params.yaml: `unlearnops tune {method} --apply` writes them in, or use the dvc exp run -S command it prints.\n")
    return header + yaml.safe_dump({"methods": {method: tree}}, sort_keys=False)


def apply_to_params(params_path: str | Path, method: str, values: dict) -> list[str]:
    """Write `values` (dotted keys under methods.<method>) into params.yaml, keeping its comments and layout
    (ruamel's round trip, as `dvc exp run -S`); atomically. Returns the changed keys."""
    import io

    import yaml
    from ruamel.yaml import YAML

    path = Path(params_path)
    text = path.read_text()
    rt = YAML()
    rt.default_flow_style = False
    tree = rt.load(text)
    plain = yaml.safe_load(text)
    for key, value in values.items():
        full = f"methods.{method}.{key}"
        try:
            get_dotted(tree["methods"][method], key)
        except (KeyError, TypeError):
            raise ConfigError(f"{path}: no key {full} to write") from None
        set_dotted(tree["methods"][method], key, value)
        set_dotted(plain["methods"][method], key, value)
    out = io.StringIO()
    rt.dump(tree, out)
    if yaml.safe_load(out.getvalue()) != plain:  # the round trip must change exactly these values
        raise ConfigError(f"{path}: writing the tuned values would change more than methods.{method}; not written")
    write_text_atomic(path, out.getvalue())
    return [f"methods.{method}.{key}" for key in values]


def dvc_exp_command(method: str, values: dict) -> str:
    return "dvc exp run " + " ".join(f"-S 'methods.{method}.{key}={json.dumps(v)}'" for key, v in values.items())


# ---------------------------------------------------------------- the study


def _storage(cfg: dict, path: Path):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(f"sqlite:///{path.resolve()}", heartbeat_interval=int(cfg["heartbeat_seconds"]),
                          grace_period=int(cfg["grace_seconds"]),
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=int(cfg["max_retry"])))


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _recover(study, storage, cfg: dict) -> int:
    """Fail trials left RUNNING by a dead process (each is retried with its params). A RUNNING trial may be
    another live `unlearnops tune`: wait out the grace period once, then only stale ones are failed."""
    import optuna
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        return 0
    time.sleep(int(cfg["grace_seconds"]) + int(cfg["heartbeat_seconds"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        optuna.storages.fail_stale_trials(study)
        return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before


class _Tracker:
    """MLflow: one parent run per study (resumed on a rerun), one child run per finished trial."""

    def __init__(self, params: dict, study, name: str, logged: dict):
        from unlearnops import tracking

        mlflow = tracking.configure(params)
        self.client = mlflow.MlflowClient()
        self.experiment_id = mlflow.get_experiment_by_name(params["mlflow"]["experiment"]).experiment_id
        run_id = study.user_attrs.get("mlflow_run_id")
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=name, tags={"unlearnops.stage": "tune"})
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=_params_list(tracking.flatten(logged)))
            study.set_user_attr("mlflow_run_id", run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def trial(self, study, trial) -> None:
        from mlflow.entities import Metric

        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.number}",
                                     tags={"mlflow.parentRunId": self.run_id, "unlearnops.stage": "tune-trial",
                                           "optuna.trial": str(trial.number), "optuna.state": trial.state.name})
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in trial.user_attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        metrics += [Metric("final_val_at_step", float(v), now, int(step)) for step, v in trial.intermediate_values.items()]
        self.client.log_batch(run.info.run_id, metrics=metrics, params=_params_list(trial.params))
        self.client.set_terminated(run.info.run_id, status="FINISHED" if trial.state.name == "COMPLETE" else "KILLED")

    def end(self, summary: dict | None, failed: bool) -> None:
        if summary is not None:
            values = {"best_final_val": (summary["best"] or {}).get("value"), "defaults_final_val": (summary["defaults"] or {}).get("value"),
                      "n_finished": summary["n_finished"]}
            for key, value in values.items():
                if value is not None:
                    self.client.log_metric(self.run_id, key, float(value))
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _params_list(values: dict) -> list:
    from mlflow.entities import Param

    return [Param(str(k), str(v)[:500]) for k, v in values.items()]


def summarize(study, method: str, setting: str, space: dict, cfg: dict, budget: float) -> dict:
    """Every trial (number, state, params, value, time / retrain, feasibility, seconds), the trial of the values params.yaml
    had when the study began (the defaults), the best feasible one (the earlier of equals: the defaults win a tie)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        ratio = t.user_attrs.get("time_vs_retrain")
        rows.append({"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
                     "time_vs_retrain": ratio, "feasible": ratio is not None and ratio <= budget,
                     "defaults": bool(t.user_attrs.get("defaults")), "seconds": seconds,
                     **{k: t.user_attrs.get(k) for k in ("forget_quality", "retain_acc", "val_acc", "forget_acc")}})
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    feasible = [r for r in complete if r["feasible"]]
    best = max(feasible, key=lambda r: r["value"]) if feasible else None
    default_row = next((r for r in complete if r["defaults"]), None)
    timed = [r["seconds"] for r in rows if r["state"] in ("COMPLETE", "PRUNED") and r["seconds"] is not None]
    return {
        "method": method, "setting": setting, "study": study.study_name,
        "objective": "Final on the validation side: F(forget vs retrained) x retain acc ratio x validation acc ratio",
        "n_models": cfg["n_models"], "time_budget": budget, "space": space,
        "n_finished": sum(r["state"] in ("COMPLETE", "PRUNED") for r in rows),
        "n_complete": len(complete), "n_feasible": len(feasible), "n_pruned": sum(r["state"] == "PRUNED" for r in rows),
        "seconds_per_trial": float(np.mean(timed)) if timed else None,
        "defaults": None if default_row is None else {"params": default_row["params"], "value": default_row["value"],
                                                      "time_vs_retrain": default_row["time_vs_retrain"], "feasible": default_row["feasible"]},
        "best": None if best is None else {"number": best["number"], "params": best["params"], "value": best["value"],
                                           "time_vs_retrain": best["time_vs_retrain"]},
        "trials": rows,
    }


def tune(params: dict, method: str, n_trials: int | None = None, params_path: str | Path = "params.yaml",
         apply: bool = False, out_dir: Path = TUNE, studies_dir: Path = STUDIES) -> dict:
    """Run (or resume) the study of `method` until it has `n_trials` (default tune.n_trials) finished trials;
    write the summary and the best params; with `apply` write them into `params_path`. Returns the summary."""
    import optuna

    from unlearnops import progress

    setting, space, defaults = study_config(params, method)
    cfg = params["tune"]
    total = int(n_trials if n_trials is not None else cfg["n_trials"])
    side = load_validation_side(params, setting)
    n_models = int(cfg["n_models"])
    if n_models > side.retrained["forget"].shape[0]:
        raise ConfigError(f"tune.n_models = {n_models} is more than the {side.retrained['forget'].shape[0]} retrained models of {setting}")
    budget = float(side.params["evaluate"]["time_budget"])
    chunk = math.ceil(n_models / int(cfg["chunks"]))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(cfg, studies_dir / setting / f"{method}.db")
    name = f"{method}-{fingerprint(params, method, setting, space)}"
    sampler = optuna.samplers.TPESampler(seed=int(cfg["seed"]))  # feasibility: each trial's set_constraint
    pruner = optuna.pruners.MedianPruner(n_startup_trials=int(cfg["pruner_startup_trials"]), n_warmup_steps=0)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler, pruner=pruner,
                                load_if_exists=True)
    if not any(t.user_attrs.get("defaults") for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(defaults, user_attrs={"defaults": True}, skip_if_exists=False)
    retried = _recover(study, storage, cfg)
    method_params = setting_params(params, setting)["methods"][method]

    def objective(trial) -> float:
        values = {key: suggest(trial, key, spec, defaults[key]) for key, spec in space.items()}
        chosen = copy.deepcopy(method_params)
        for key, value in values.items():
            set_dotted(chosen, key, value)

        def record(scores: dict) -> None:  # also before pruning: a pruned trial's time (its constraint) is known too
            for key, value in scores.items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("retrain_seconds_per_model", side.retrain_seconds_per_model)
            trial.set_constraint("time_over_budget", scores["time_vs_retrain"] - budget)  # <= 0: feasible; set once

        def report(scores: dict, step: int) -> None:
            trial.report(scores["final_val"], step)
            if trial.should_prune():
                record(scores)
                raise optuna.TrialPruned()

        # retraining's time measured beside each trial: on a shared machine the load drifts over a study
        side.retrain_seconds_per_model = measure_retrain_seconds(side, chunk)
        result = run_trial(side, method, chosen, n_models, int(cfg["chunks"]), report)
        record(result)
        return result["final_val"]

    tracker = _Tracker(params, study, f"tune-{setting}-{method}",
                       {"setting": setting, "method": method, "study": name, "space": space, "n_models": n_models})
    remaining = max(0, total - _finished(study))
    bar = progress.bar(desc=f"tune {method} ({setting})", total=total, initial=total - remaining)
    if retried:
        bar.set_postfix(retried=retried)

    def after(study, trial) -> None:
        tracker.trial(study, trial)
        if trial.state.name in ("COMPLETE", "PRUNED"):
            bar.update(1)
        feasible = [t.value for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"
                    and t.user_attrs.get("time_vs_retrain", math.inf) <= budget]
        if feasible:
            bar.set_postfix(best=f"{max(feasible):.4f}")

    failed = True
    summary = None
    try:
        while _finished(study) < total:  # a trial that fails raises; a retried one runs first (it waits in the queue)
            study.optimize(objective, n_trials=total - _finished(study), callbacks=[after])
        summary = summarize(study, method, setting, space, cfg, budget)
        failed = False
    finally:
        bar.close()
        tracker.end(summary, failed)
    write_json(out_dir / setting / f"{method}.json", summary, sort_keys=False)
    if summary["best"] is not None:
        best = summary["best"]
        write_text_atomic(out_dir / setting / f"{method}.yaml",
                          best_params_yaml(method, best["params"], setting, best["value"], (summary["defaults"] or {}).get("value")))
        if apply:
            summary["applied"] = apply_to_params(params_path, method, best["params"])
    return summary
