"""The report's relearning section: a table (Markdown + CSV) and a plot of the relearning attack.

Reads metrics/relearn/<name>.json for retrain (the `evaluate_retrain` stage) and every unlearning
run (its `evaluate` stage); `report.build` calls `build`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from unlearnops.files import write_atomic, write_csv, write_text_atomic
from unlearnops.layout import run_names


def _read(metrics_dir: Path, name: str) -> dict:
    path = metrics_dir / "relearn" / f"{name}.json"
    if not path.is_file():
        stage = "the evaluate_retrain stage" if name == "retrain" else f"the evaluate stage of {name}"
        raise FileNotFoundError(f"{path} not found (run {stage} first)")
    return json.loads(path.read_text())


def _folds(numbers: list[int]) -> str:
    return "+".join(f"F{n}" for n in numbers)


def relearn_table(params: dict, metrics_dir: Path) -> pd.DataFrame:
    """From metrics_dir/relearn/*.json: one row per (method, S): accuracy on T before the attack, after it (best epoch), and the
    retrained models' accuracy on T after the same attack; means and standard deviations over models."""
    retrain = _read(metrics_dir, "retrain")
    rows = []
    for name in ["retrain", *run_names(params)]:
        result = retrain if name == "retrain" else _read(metrics_dir, name)
        for key, entry in result["subsets"].items():
            reference = retrain["subsets"][key]
            rows.append(
                {
                    "method": name,
                    "S": _folds(entry["S"]),
                    "T": _folds(entry["T"]),
                    "models": result["n_models"],
                    **{f"before_{s}": entry["before"][s] for s in ("mean", "std")},
                    **{f"after_{s}": entry["after"][s] for s in ("mean", "std")},
                    **{f"retrain_after_{s}": reference["after"][s] for s in ("mean", "std")},
                }
            )
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    cell = lambda row, name: f"{row[name + '_mean']:.3f} ± {row[name + '_std']:.3f}"  # noqa: E731
    shown = pd.DataFrame(
        {
            "method": table["method"],
            "relearn on S": table["S"],
            "measure on T": table["T"],
            "models": table["models"],
            "acc on T before": [cell(r, "before") for _, r in table.iterrows()],
            "acc on T after attack": [cell(r, "after") for _, r in table.iterrows()],
            "retrain after attack": [cell(r, "retrain_after") for _, r in table.iterrows()],
        }
    )
    note = (
        "Relearning attack: fine-tune on the forget folds S only, report the best accuracy on the other "
        "folds T over the attack's epochs (mean ± std over models). A robust method stays near retrain's "
        "accuracy after the same attack.\n\n"
    )
    return note + shown.to_markdown(index=False) + "\n"


def relearn_curves(params: dict, metrics_dir: Path) -> pd.DataFrame:
    """The attack's curves: per run (retrain first) and S, the mean accuracy on T after each epoch
    of the attack (epoch 0: before it); the data of reports/plots/relearn/<setting>.csv."""
    rows = []
    for name in ["retrain", *run_names(params)]:
        for entry in _read(metrics_dir, name)["subsets"].values():
            rows += [{"method": name, "S": _folds(entry["S"]), "T": _folds(entry["T"]), "epoch": epoch, "accuracy": accuracy}
                     for epoch, accuracy in enumerate(entry.get("per_epoch", []))]
    return pd.DataFrame(rows, columns=["method", "S", "T", "epoch", "accuracy"])


def relearn_plot(table: pd.DataFrame, path: Path) -> None:
    """Per run, one row of horizontal bars per S: accuracy on T after the attack (std error bars)
    beside retrain's after the same attack; a dot marks the accuracy before the attack. One panel
    per S, the runs down the page: the labels stay horizontal and readable at page width however
    many runs there are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = table[table["method"] != "retrain"].reset_index(drop=True)
    subsets = list(dict.fromkeys(rows["S"]))
    methods = list(dict.fromkeys(rows["method"]))
    y = np.arange(len(methods))
    height = 0.38
    fig, axes = plt.subplots(1, max(1, len(subsets)), figsize=(10, 1.2 + 0.34 * len(methods)), sharey=True, squeeze=False)
    for ax, subset in zip(axes[0], subsets):
        part = rows[rows["S"] == subset].set_index("method").reindex(methods)
        ax.barh(y - height / 2, part["after_mean"], height, xerr=part["after_std"], capsize=2, label="run, after attack", color="tab:blue")
        ax.barh(y + height / 2, part["retrain_after_mean"], height, xerr=part["retrain_after_std"], capsize=2, color="tab:gray",
                label="retrain, after attack")
        ax.plot(part["before_mean"], y - height / 2, "k.", markersize=8, label="run, before attack")
        ax.set_xlim(0, 1.05)
        ax.set_title(f"relearn on S={subset}, accuracy on T={part['T'].dropna().iloc[0] if part['T'].notna().any() else '?'}", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_yticks(y, methods)
    axes[0, 0].invert_yaxis()
    for ax in axes[0]:
        ax.set_xlabel("accuracy on the other folds T", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)  # below the panels, over no bar
    fig.suptitle("Relearning attack: fine-tune on folds S only; a robust run stays near retrain", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)


def build(params: dict, metrics_dir: Path, out_dir: Path) -> list[Path]:
    """Write reports/relearn.{csv,md,png}; returns their paths."""
    table = relearn_table(params, Path(metrics_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out_dir / "relearn.csv", out_dir / "relearn.md", out_dir / "relearn.png"
    write_csv(csv_path, table, index=False)
    write_text_atomic(md_path, markdown(table))
    relearn_plot(table, png_path)
    return [csv_path, md_path, png_path]
