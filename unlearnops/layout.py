"""Names and paths of the benchmark grid: the bottom of the house (imports only config).

The benchmark is a grid (params.yaml `datasets` x `settings` x methods); one setting's params are
the global sections merged with its data set's and its own overrides (`setting_params`), and its
files sit in its own folders (`setting_layout`):

  data/split/<dataset>/         images.pt, samples.csv: the split, the same for every setting of the data set
  data/prepared/<setting>/      samples.csv: the split and this setting's forget set
  models/<dataset>/target/      the target, trained once per data set
  models/<setting>/retrain/     retrained models; models/<setting>/unlearned/<run>/: each method's runs
  models/<setting>/inputs.json  hashes of the split and target the setting's runs read (a DVC dependency)
  metrics/<setting>/*.json      small, flat numbers for `dvc metrics show`; metrics/<dataset>/target.json
  evaluation/<setting>/         the full evidence: <run>.json, <run>.npz, retrain_mia.json, relearn/

Without a setting, one flat layout (data/prepared, models/target, metrics/methods, ...) with
`params` as given: the deletion flow's data and a single run.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

from unlearnops.config import ConfigError, choose

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
SUMMARY = Path("summary")  # summary/<setting>.json: the report's compact per-setting metrics, versioned in git (`dvc metrics diff`)
TUNE = Path("tune")  # tune/<setting>/<method>.json and .yaml: `unlearnops tune`'s summaries and best params (the report reads them)
STUDIES = Path(".optuna")  # .optuna/<setting>/<method>.db: `unlearnops tune`'s Optuna studies (SQLite, resumable)

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


def setting_layout(params: dict, setting: str | None = None) -> Layout:
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


def ops_dataset(params: dict) -> str:
    """`ops.dataset`, the production data set: its target becomes the deletion flow's first champion."""
    dataset = params["ops"]["dataset"]
    _entry(params, "datasets", dataset, DATASET_SECTIONS)
    return dataset


def seeds(base: int, n: int) -> list[int]:
    return [base + i for i in range(n)]


def run_names(params: dict) -> list[str]:
    """Every unlearning run of the benchmark: each method, Layered Unlearning (`unlearn.layered`, its own
    DVC stage), then each method on the Blend-condensed retain set."""
    return [*params["unlearn"]["methods"], *params["unlearn"].get("layered", []),
            *(f"{m}+blend" for m in params.get("condense", {}).get("methods", []))]


def production_data(params: dict | None = None) -> Path:
    """The production data: the split of `ops.dataset` that the benchmark grid wrote
    (data/split/<dataset>), else the flat layout of a single run (data/prepared)."""
    if params is not None and params.get("datasets"):
        grid = dataset_layout(params["ops"]["dataset"]).split
        if (grid / "samples.csv").is_file():
            return grid
    return PREPARED


def samples_table(params: dict | None = None) -> Path:
    path = production_data(params) / "samples.csv"
    if not path.is_file():
        raise ConfigError(f"samples table not found: {path} (run the prepare stage: dvc repro prepare, or split@<ops.dataset>)")
    return path
