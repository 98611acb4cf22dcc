"""The benchmark report: one table comparing target, retrain and every method."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from unlearnops import report_relearn


def _row(name: str, metrics: dict, retrain_seconds: float) -> dict:
    acc = metrics["accuracy"]
    cell = lambda split: f"{acc[split]['mean']:.3f} ± {acc[split]['std']:.3f}"  # noqa: E731
    return {
        "method": name,
        "models": metrics["n_models"],
        "retain acc": cell("retain"),
        "forget acc": cell("forget"),
        "test acc": cell("test"),
        "time/model [s]": round(metrics["seconds_per_model"], 3),
        "time vs retrain": round(metrics["seconds_per_model"] / retrain_seconds, 3),
    }


def accuracy_table(params: dict, metrics_dir: Path) -> pd.DataFrame:
    load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
    retrain = load(metrics_dir / "retrain.json")
    rows = [_row("target", load(metrics_dir / "target.json"), retrain["seconds_per_model"]), _row("retrain", retrain, retrain["seconds_per_model"])]
    for name in params["unlearn"]["methods"]:
        rows.append(_row(name, load(metrics_dir / "methods" / f"{name}.json"), retrain["seconds_per_model"]))
    return pd.DataFrame(rows)


def build(params: dict, metrics_dir: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = accuracy_table(params, metrics_dir)
    csv_path, md_path = out_dir / "accuracy.csv", out_dir / "accuracy.md"
    table.to_csv(csv_path, index=False)
    md_path.write_text(table.to_markdown(index=False) + "\n")
    return [csv_path, md_path, *report_relearn.build(params, metrics_dir, out_dir)]
