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


def relearn_plot(table: pd.DataFrame, path: Path) -> None:
    """Per method and S: accuracy on T after the attack beside retrain's, with std error bars;
    a dot marks the accuracy before the attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = table[table["method"] != "retrain"].reset_index(drop=True)
    x = np.arange(len(rows))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.2))
    ax.bar(x - width / 2, rows["after_mean"], width, yerr=rows["after_std"], capsize=3, label="method, after attack")
    ax.bar(x + width / 2, rows["retrain_after_mean"], width, yerr=rows["retrain_after_std"], capsize=3, color="tab:gray", label="retrain, after attack")
    ax.plot(x - width / 2, rows["before_mean"], "k.", markersize=9, label="method, before attack")
    ax.set_xticks(x, [f"{m}\nS={s}" for m, s in zip(rows["method"], rows["S"])], fontsize=8)
    ax.set_ylabel("accuracy on the other folds T")
    ax.set_ylim(0, 1.05)
    ax.set_title("Relearning attack: fine-tune on folds S, accuracy on T")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
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
