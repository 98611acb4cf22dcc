"""The report's U-LiRA section: per setting a table of every run's attack figures beside retrain's
(the chance floor) and the original's (the shadow targets, not unlearned: where every method starts), and a plot
of each example's vulnerability (per-example attack AUC) under each run.

Reads evaluation/<setting>/ulira.json and ulira.npz (the `ulira@<setting>` stages, unlearnops.ulira)
for the settings of params `evaluate.ulira.settings`; `report.build` calls `load`, `table`, `markdown`, `plot`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from unlearnops.files import write_atomic
from unlearnops.layout import Layout

REFERENCES = ("original", "retrain")
MOST_EXPOSED = 5  # examples named per setting: the highest mean per-example AUC over the methods


def load(params: dict, settings: dict[str, tuple[dict, Layout]]) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
    """setting -> (ulira.json, ulira.npz arrays) for the reported settings U-LiRA runs on."""
    found = {}
    for setting in params["evaluate"]["ulira"]["settings"]:
        if setting not in settings:
            continue
        evidence = settings[setting][1].evidence
        path = evidence / "ulira.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (run the ulira@{setting} stage first)")
        with np.load(evidence / "ulira.npz") as arrays:
            found[setting] = (json.loads(path.read_text()), dict(arrays))
    return found


def table(found: dict[str, tuple[dict, dict]]) -> pd.DataFrame:
    """One row per (setting, run): AUC, accuracy, TPR at 1% / 0.1% FPR, mean per-example AUC, and the counts they rest on."""
    rows = []
    for setting, (summary, _) in found.items():
        for name, r in summary["runs"].items():
            rows.append({"setting": setting, "method": name, "auc": r["auc"], "accuracy": r["accuracy"],
                         "tpr_at_1pct_fpr": r["tpr_at_0.01_fpr"], "tpr_at_0.1pct_fpr": r["tpr_at_0.001_fpr"],
                         "mean_example_auc": r["mean_example_auc"], "runs": r["runs"], "n_in": r["n_in"], "n_out": r["n_out"],
                         "splits": summary["splits"], "runs_per_split": summary["runs_per_split"], "pool": summary["pool"],
                         "seconds": summary["seconds"].get(name)})
    columns = ["setting", "method", "auc", "accuracy", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "mean_example_auc", "runs", "n_in",
               "n_out", "splits", "runs_per_split", "pool", "seconds"]
    return pd.DataFrame(rows, columns=columns)


def markdown(found: dict[str, tuple[dict, dict]], settings_on: list[str]) -> str:
    if not found:
        return ("U-LiRA is off for the reported settings (params evaluate.ulira.settings: "
                f"{settings_on}).\n")
    text = ("U-LiRA (Hayes et al., arXiv 2403.01218): per (model, example), a likelihood-ratio test of \"trained on it, then "
            "unlearned\" against \"never trained on it\", with Gaussians fit on shadow models of the other splits. "
            "retrain: the retrained models (in and out both never saw the example): the chance floor for this many models. "
            "original: the shadow targets before unlearning, what every method starts from. A method that forgets sits near "
            "retrain; one above the original is given away by its unlearning itself (e.g. forget confidences pushed below "
            "a never-seen model's). "
            "TPR at 0.1% FPR means something only with n_out >= 1000 pairs; every figure depends on the splits, runs per split "
            "and pool size shown.\n\n")
    shown = table(found)
    for setting, (summary, arrays) in found.items():
        part = shown[shown["setting"] == setting].drop(columns=["setting", "splits", "runs_per_split", "pool"])
        exposed = most_exposed(summary, arrays)
        text += (f"## {setting}\n\n{summary['splits']} splits x {summary['runs_per_split']} runs per split, pool of {summary['pool']} "
                 f"forget examples; shadow training {summary['seconds']['shadows']:.0f} s, all {summary['seconds']['total']:.0f} s.\n\n"
                 + part.to_markdown(index=False, floatfmt=".3f") + "\n\n"
                 + f"Most exposed examples (highest mean per-example AUC over the methods): {', '.join(exposed)}\n\n")
    return text


def _methods(summary: dict) -> list[str]:
    return [name for name in summary["runs"] if name not in REFERENCES]


def example_auc(summary: dict, arrays: dict) -> pd.DataFrame:
    """[runs x pool examples] per-example attack AUC (original first, retrain last), columns the example ids."""
    names = ["original", *_methods(summary), "retrain"]
    return pd.DataFrame(np.stack([arrays[f"{name}/example_auc"] for name in names]), index=names, columns=list(arrays["pool_ids"]))


def most_exposed(summary: dict, arrays: dict) -> list[str]:
    grid = example_auc(summary, arrays)
    mean = grid.loc[_methods(summary)].mean()
    return [f"{example} ({value:.2f})" for example, value in mean.sort_values(ascending=False).head(MOST_EXPOSED).items()]


def plot_data(summary: dict, arrays: dict) -> pd.DataFrame:
    """The plot's data, one row per (run, example): reports/plots/ulira/<setting>.csv."""
    grid = example_auc(summary, arrays)
    return grid.rename_axis("method").reset_index().melt(id_vars="method", var_name="example", value_name="example_auc")


def plot(setting: str, summary: dict, arrays: dict, path: Path) -> Path:
    """A heat map of per-example attack AUC: runs down (original first, retrain last), examples across,
    the most exposed on the left (mean over the methods); the run's overall AUC in its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = example_auc(summary, arrays)
    order = grid.loc[_methods(summary)].mean().sort_values(ascending=False).index
    grid = grid[order]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * grid.shape[1] + 3), 1.0 + 0.32 * grid.shape[0]))
    image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="RdBu_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    labels = [f"{name} (AUC {summary['runs'][name]['auc']:.2f})" if summary["runs"][name]["auc"] is not None else name for name in grid.index]
    ax.set_yticks(np.arange(grid.shape[0]), labels, fontsize=8)
    ax.set_xticks(np.arange(grid.shape[1]), list(grid.columns), rotation=90, fontsize=6)
    ax.set_xlabel("forget example (sample id), most exposed first")
    fig.colorbar(image, ax=ax, label="per-example attack AUC (0.5: chance)")
    ax.set_title(f"U-LiRA on {setting}: {summary['splits']} splits x {summary['runs_per_split']} runs, pool {summary['pool']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path
