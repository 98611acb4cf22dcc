"""One schema for params.yaml's sections other than `methods` (the methods registry checks those).

`validate_params(params)` raises ONE ConfigError naming every bad key by its path, e.g.
`data.samples_per_pseudo_user must be >= 1`: unknown keys, missing keys, wrong types (strict: a
string is not a number, a bool is not an int) and out-of-range values. The grid's `datasets` and
`settings` overrides are checked as merged into the defaults, so an override is held to the same
rules. Paths that must be files (`data.deleted`) are checked to be a file or absent.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from unlearnops.config import ConfigError

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_+\-]*$", max_length=100)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
OpenFraction = Annotated[float, Field(gt=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Positive = Annotated[float, Field(gt=0.0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Synthetic(Strict):
    n_samples: PositiveInt
    n_classes: Annotated[int, Field(ge=2)]
    image_size: PositiveInt
    channels: PositiveInt
    noise: NonNegative
    seed: int


class Data(Strict):
    name: Literal["digits", "cifar10", "image_folder", "synthetic"]
    root: str
    csv: str
    image_size: PositiveInt
    num_classes: Annotated[int, Field(ge=2)] | None
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)]
    test_fraction: Annotated[float, Field(ge=0.0, lt=1.0)]
    split_seed: int
    samples_per_pseudo_user: PositiveInt
    deleted: Annotated[str, StringConstraints(min_length=1)]
    synthetic: Synthetic

    @field_validator("deleted")
    @classmethod
    def _a_file_or_absent(cls, value: str) -> str:
        if Path(value).exists() and not Path(value).is_file():
            raise ValueError(f"must be a file or absent, but {value} is not a file")
        return value


class Forget(Strict):
    mode: Literal["random", "users", "class"]
    fraction: OpenFraction
    n_users: PositiveInt
    class_: Count = Field(alias="class")
    seed: int


class SmallResnet(Strict):
    widths: Annotated[list[PositiveInt], Field(min_length=1)]


class SmallCnn(Strict):
    width: PositiveInt


class RandomFeatures(Strict):
    features: PositiveInt
    lengthscale: Positive
    seed: int


class Resnet18(Strict):
    small_input_stem: bool


class Model(Strict):
    arch: Literal["small_resnet", "small_cnn", "resnet18", "random_features"]
    small_resnet: SmallResnet
    small_cnn: SmallCnn
    random_features: RandomFeatures
    resnet18: Resnet18


class Runtime(Strict):
    device: Literal["auto", "cpu", "cuda"]
    threads: PositiveInt | None
    models_per_pass: PositiveInt | Literal["auto"]
    eval_batch_size: PositiveInt
    bf16: bool
    compile: bool | Literal["auto"]
    chunk_models: PositiveInt | None
    store: str | None


class Fit(Strict):
    batch_size: PositiveInt
    optimizer: Literal["sgd", "adam"]
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)]
    weight_decay: NonNegative
    schedule: Literal["constant", "cosine", "linear"]
    warmup_fraction: Fraction
    stop_patience: Count
    stop_tolerance: NonNegative


class TrainFit(Fit):
    epochs: Count
    lr: Positive


class Train(Strict):
    seed: int
    augment: bool
    fit: TrainFit


class Seed(Strict):
    seed: int


class Folds(Strict):
    k: Annotated[int, Field(ge=2)]
    fold_seed: int


class Unlearn(Strict):
    seed: int
    methods: Annotated[list[Name], Field(min_length=1)]
    layered: list[Name] = []   # Layered Unlearning has its own stages (dvc.yaml unlearn_layered)


class Blend(Strict):
    ipc: PositiveInt
    feature_net: Literal["random", "target"]
    seed: int
    kmeans_n_init: PositiveInt
    iterations: Count
    lr: Positive
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)]


class Condense(Strict):
    methods: list[Name]
    blend: Blend


class Ulira(Strict):
    settings: list[Name]
    splits: Annotated[int, Field(ge=2)]
    runs_per_split: PositiveInt
    examples: Annotated[int, Field(ge=2)]
    seed: int
    fixed_variance: bool


class Evaluate(Strict):
    seed: int
    retain_max_samples: PositiveInt | None
    interval_level: OpenFraction
    mia_models: PositiveInt
    mia_splits: Annotated[int, Field(ge=2)]
    js_bins: PositiveInt
    time_budget: Positive
    ulira: Ulira


class Relearn(Folds):
    n_models: PositiveInt
    fit: TrainFit


class Mlflow(Strict):
    tracking_uri: Annotated[str, StringConstraints(min_length=1)]
    artifact_root: Annotated[str, StringConstraints(min_length=1)]
    experiment: Annotated[str, StringConstraints(min_length=1)]


class Layered2d(Strict):
    seeds: PositiveInt
    n_samples: PositiveInt
    half_width: Positive
    n_sites: PositiveInt
    site_spread: NonNegative
    site_radius: NonNegative
    std: Positive
    rbf_grid: PositiveInt
    rbf_sigma: Positive
    lr: Positive
    epochs: PositiveInt
    batch_size: PositiveInt
    relearn_lr: Positive
    relearn_epochs: PositiveInt


class IntervalCoverage(Strict):
    seed: int
    n_models: PositiveInt
    population: PositiveInt
    forget_sizes: list[PositiveInt]
    draws: PositiveInt
    bootstrap_resamples: PositiveInt
    example_mean: Annotated[list[float], Field(min_length=2, max_length=2)]
    example_spread: Annotated[list[float], Field(min_length=2, max_length=2)]
    model_offset_sd: NonNegative
    scenarios: dict[Name, Annotated[list[float], Field(min_length=3, max_length=3)]]
    n_models_curve: list[PositiveInt]
    curve_examples: PositiveInt
    curve_subsets: PositiveInt


class Benchmarks(Strict):
    layered_2d: Layered2d
    interval_coverage: IntervalCoverage


class Gates(Strict):
    retrain_reference: bool
    max_forget_accuracy_gap: NonNegative
    max_mia_auc_gap: NonNegative
    max_test_accuracy_drop: float
    max_retain_accuracy_drop: float
    mia_splits: Annotated[int, Field(ge=2)]
    mia_seed: int
    confidence: Annotated[float, Field(ge=0.5, lt=1.0)]


class Onnx(Strict):
    opset: Annotated[int, Field(ge=7)]
    max_abs_logit_diff: NonNegative
    min_top1_agreement: Fraction
    parity_max_samples: PositiveInt | None


class Schedule(Strict):
    interval_minutes: Positive
    cron: Annotated[str, StringConstraints(min_length=1)] | None


class OpsBenchmark(Strict):
    gpus: Literal["auto"] | list[Count]
    max_parallel: PositiveInt
    cluster: Annotated[str, StringConstraints(pattern=r"^[a-z]+://\S+$")] | None = None  # a Dask scheduler address


class Ops(Strict):
    ledger_url: Annotated[str, StringConstraints(min_length=1)]
    model_name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,199}$")]
    dataset: Name
    ui_url: str
    method: Name
    benchmark_setting: Name
    fallback_method: Name
    seed: int
    work_dir: Annotated[str, StringConstraints(min_length=1)]
    deadline_days: PositiveInt = 30
    lease_seconds: Annotated[float, Field(ge=1.0)] = 300.0
    gates: Gates
    onnx: Onnx
    work_pool: Annotated[str, StringConstraints(min_length=1)]
    prefect_startup_timeout_s: Annotated[int, Field(ge=1)]
    schedule: Schedule
    benchmark: OpsBenchmark


class TuneSpec(Strict):
    """One searched hyperparameter: an interval {low, high, log} (log: sampled on a log scale, low > 0), or {choices}."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: Annotated[list[bool | int | float | str], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _a_range_or_choices(self) -> "TuneSpec":
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("give either choices or low/high/log, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if self.low > self.high:
            raise ValueError(f"low {self.low:g} > high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log scale needs low > 0, got low {self.low:g}")
        return self


DottedKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")]


class Tune(Strict):
    setting: Name | None
    seed: int
    n_trials: PositiveInt
    n_models: Annotated[int, Field(ge=2)]
    chunks: PositiveInt
    pruner_startup_trials: Count
    heartbeat_seconds: PositiveInt
    grace_seconds: PositiveInt
    max_retry: Count
    spaces: dict[Name, dict[DottedKey, TuneSpec]]

    @model_validator(mode="after")
    def _grace_after_heartbeat(self) -> "Tune":
        if self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError(f"grace_seconds ({self.grace_seconds}) must exceed heartbeat_seconds ({self.heartbeat_seconds})")
        if self.chunks > self.n_models:
            raise ValueError(f"chunks ({self.chunks}) must be <= n_models ({self.n_models})")
        return self


def tune_space_problems(params: dict) -> list[str]:
    """tune.spaces' keys against methods.<method>: each must name a scalar hyperparameter there, and an
    int hyperparameter needs whole-number bounds."""
    problems = []
    for method, space in (params["tune"]["spaces"] or {}).items():
        hparams = params["methods"].get(method)
        if not isinstance(hparams, dict):
            problems.append(f"tune.spaces.{method}: no methods.{method} in params.yaml")
            continue
        for key, spec in space.items():
            node = hparams
            for part in key.split("."):
                node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
            where = f"tune.spaces.{method}.{key}"
            if node is KeyError or isinstance(node, (dict, list)):
                problems.append(f"{where}: methods.{method}.{key} is not a hyperparameter of {method}")
            elif isinstance(node, int) and not isinstance(node, bool) and "low" in spec \
                    and not all(float(spec[b]).is_integer() for b in ("low", "high")):
                problems.append(f"{where}: methods.{method}.{key} is an int, so low and high must be whole numbers")
    return problems


class DatasetEntry(Strict):
    data: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    train: dict[str, Any] | None = None


class SettingEntry(Strict):
    dataset: Name
    forget: dict[str, Any] | None = None


class Params(Strict):
    n_models: PositiveInt
    datasets: Annotated[dict[Name, DatasetEntry | None], Field(min_length=1)]
    settings: Annotated[dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-]+$")], SettingEntry],
                        Field(min_length=1)]
    data: Data
    forget: Forget
    model: Model
    runtime: Runtime
    train: Train
    retrain: Seed
    unlearn: Unlearn
    condense: Condense
    methods: dict[Name, Any]  # checked by the methods registry
    evaluate: Evaluate
    relearn: Relearn
    tune: Tune
    mlflow: Mlflow
    benchmarks: Benchmarks
    ops: Ops


def _describe(error: dict, prefix: str = "") -> str:
    path = prefix + ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
    path = path.replace("class_", "class")
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "missing":
        return f"{path}: missing"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"{path} must be {op} {bound}, got {error.get('input')!r}"
    if kind == "literal_error":
        return f"{path} must be one of {ctx.get('expected')}, got {error.get('input')!r}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: {message[0].lower() + message[1:]}, got {error.get('input')!r}"


def _check(model: type[BaseModel], values: Any, prefix: str = "") -> list[str]:
    try:
        model.model_validate(values)
    except ValidationError as err:
        seen: dict[str, str] = {}
        for e in err.errors():
            text = _describe(e, prefix)
            key = text.split(" ")[0].rstrip(":")
            seen.setdefault(key, text)  # a union reports each branch: keep the first per path
        return list(seen.values())
    return []


def load_checked_params(path: str | Path = "params.yaml") -> dict:
    """Read params.yaml (a missing, unreadable or malformed file is a ConfigError) and validate it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    validate_params(params)
    return params


def validate_params(params: Any) -> None:
    """Raise one ConfigError listing every bad key of params.yaml (except `methods.*`)."""
    if not isinstance(params, dict):
        raise ConfigError(f"params.yaml must hold a mapping of sections, got {type(params).__name__}")
    problems = _check(Params, params)
    if not problems:  # the grid's entries, merged into the defaults
        from unlearnops.layout import setting_params

        for name in params["settings"]:
            try:
                merged = setting_params(copy.deepcopy(params), name)
            except ConfigError as err:
                problems.append(f"settings.{name}: {err}")
                continue
            for section, model in (("data", Data), ("forget", Forget), ("model", Model), ("train", Train)):
                problems += _check(model, merged[section], f"settings.{name} -> {section}.")
        problems += tune_space_problems(params)
        if params["tune"]["setting"] is not None and params["tune"]["setting"] not in params["settings"]:
            problems.append(f"tune.setting {params['tune']['setting']!r} is not one of {sorted(params['settings'])}")
        for key in ("dataset", "benchmark_setting"):
            pool = params["datasets"] if key == "dataset" else params["settings"]
            if params["ops"][key] not in pool:
                problems.append(f"ops.{key} {params['ops'][key]!r} is not one of {sorted(pool)}")
        problems += [f"evaluate.ulira.settings: {name!r} is not one of {sorted(params['settings'])}"
                     for name in params["evaluate"]["ulira"]["settings"] if name not in params["settings"]]
    if problems:
        shown = problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
        raise ConfigError("params.yaml: " + "; ".join(shown))
