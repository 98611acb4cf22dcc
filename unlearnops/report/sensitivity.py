"""The report's sensitivity section: how much Final moves across the good trials of each tuned method.

Hyperparameter sensitivity is the most common reason results cannot be reproduced (the peers'
issue trackers: Unlearn-Saliency #7, #10, #25; Unlearn-Sparse #4, #5; open-unlearning #71, #137).
`unlearnops tune <method>` leaves tune/<setting>/<method>.json (every trial of its Optuna study);
here, per setting and tuned method: the good trials are the top quarter by Final of the completed
trials within the time budget (all of them when fewer than 4), and the table shows their Final's
min / median / max and spread (max - min), beside the defaults' and the best Final. A method whose
good trials spread widely is fragile: a small change of its hyperparameters moves its score. All
values are on the validation side with tune.n_models models, so they compare with each other, not
with Table 1's test-side Final at n_models.

Plot per setting (reports/plots/sensitivity/<setting>.png, its data in the .csv beside it): every
feasible trial's Final per method, good trials highlighted, the defaults marked.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from unlearnops.files import write_atomic, write_csv, write_text_atomic  # noqa: E402

GOOD_QUANTILE = 0.75   # good trials: Final at or above this quantile of the completed feasible trials
MIN_FOR_QUANTILE = 4   # fewer feasible trials than this: all of them count as good
TRIAL_COLUMNS = ["setting", "method", "trial", "final", "good", "defaults", "time_vs_retrain"]


def load_summaries(tune_dir: Path, settings: list[str]) -> list[dict]:
    """Every tune/<setting>/<method>.json of the report's settings, by setting then method."""
    found = []
    for setting in settings:
        for path in sorted((Path(tune_dir) / setting).glob("*.json")):
            found.append(json.loads(path.read_text()))
    return found


def trials(summary: dict) -> pd.DataFrame:
    """The completed trials within the time budget, with `good` marking the top quarter by Final."""
    rows = [{"setting": summary["setting"], "method": summary["method"], "trial": t["number"], "final": t["value"],
             "defaults": t["defaults"], "time_vs_retrain": t["time_vs_retrain"]}
            for t in summary["trials"] if t["state"] == "COMPLETE" and t["feasible"]]
    frame = pd.DataFrame(rows, columns=[c for c in TRIAL_COLUMNS if c != "good"])
    if len(frame) < MIN_FOR_QUANTILE:
        frame["good"] = True
    else:
        frame["good"] = frame["final"] >= np.quantile(frame["final"], GOOD_QUANTILE)
    return frame[TRIAL_COLUMNS]


def table(summaries: list[dict]) -> pd.DataFrame:
    """One row per (setting, method): how far Final moves across the good trials."""
    rows = []
    for summary in summaries:
        frame = trials(summary)
        good = frame.loc[frame["good"], "final"]
        defaults = summary.get("defaults") or {}
        best = summary.get("best") or {}
        rows.append({
            "setting": summary["setting"], "method": summary["method"], "n_models": summary["n_models"],
            "trials": summary["n_finished"], "feasible": len(frame), "good": len(good),
            "defaults Final": defaults.get("value"), "best Final": best.get("value"),
            "good min": good.min() if len(good) else None, "good median": good.median() if len(good) else None,
            "good max": good.max() if len(good) else None,
            "good spread": (good.max() - good.min()) if len(good) else None,
            "all feasible spread": (frame["final"].max() - frame["final"].min()) if len(frame) else None,
            "best params": json.dumps(best.get("params", {}), sort_keys=True),
        })
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return ("No tuned method yet: `unlearnops tune <method>` runs an Optuna search and leaves "
                "tune/<setting>/<method>.json, which this section reads.\n")
    shown = frame.drop(columns=["best params"]).copy()
    for column in shown.columns[6:]:
        shown[column] = shown[column].map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.3f}")
    return (shown.to_markdown(index=False, disable_numparse=True) + "\n\n"
            f"Final on the validation side (validation accuracy in place of test accuracy) with n_models models per trial. "
            f"Good trials: the top quarter by Final of the completed trials within the time budget (all when fewer than "
            f"{MIN_FOR_QUANTILE}). A large good spread: the method's score depends on its hyperparameters even among its "
            "better settings (fragile); a small one: any good setting reproduces it.\n")


def plot(frames: list[pd.DataFrame], setting: str, path: Path) -> Path:
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TRIAL_COLUMNS)
    methods = list(dict.fromkeys(data["method"]))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * max(1, len(methods))))
    for row, method in enumerate(methods):
        points = data[data["method"] == method]
        jitter = np.random.default_rng(row).uniform(-0.15, 0.15, len(points))  # fixed: the same plot every time
        for good, colour in ((False, "#bbbbbb"), (True, "#1f77b4")):
            chosen = (points["good"] == good).to_numpy()
            ax.scatter(points["final"][chosen], row + jitter[chosen], s=18, color=colour, label=None)
        default = points[points["defaults"]]
        ax.scatter(default["final"], [row] * len(default), marker="x", s=60, color="#d62728")
    ax.set_yticks(range(len(methods)), methods)
    ax.set_ylim(-0.5, max(1, len(methods)) - 0.5)
    ax.set_xlabel("Final (validation side)")
    ax.set_title(f"{setting}: Final of each tuning trial (blue: top quarter, x: defaults)", fontsize=9)
    if not methods:
        ax.text(0.5, 0.5, "no `unlearnops tune` study for this setting", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    write_csv(path.with_suffix(".csv"), data, index=False)
    return path


def build(out_dir: Path, tune_dir: Path, settings: list[str]) -> tuple[pd.DataFrame, str, dict[str, Path], list[Path]]:
    """reports/sensitivity.csv and .md, one plot per setting; returns (table, markdown, {caption: png}, the other files written)."""
    summaries = load_summaries(tune_dir, settings)
    frame = table(summaries)
    text = markdown(frame)
    write_csv(out_dir / "sensitivity.csv", frame, index=False)
    write_text_atomic(out_dir / "sensitivity.md", text)
    plots = {}
    for setting in settings:
        path = out_dir / "plots" / "sensitivity" / (re.sub(r"[^A-Za-z0-9._-]+", "_", setting) + ".png")
        plots[f"{setting}: hyperparameter sensitivity, Final of each tuning trial"] = plot(
            [trials(s) for s in summaries if s["setting"] == setting], setting, path)
    data = [out_dir / "sensitivity.csv", out_dir / "sensitivity.md"] + [path.with_suffix(".csv") for path in plots.values()]
    return frame, text, plots, data
