"""Wall time of the last `unlearnops repro` (make run), per stage, from its MLflow runs.

    PYTHONPATH=. python benchmarks/pipeline_stage_times.py [--params params.yaml]

Every stage is one MLflow run nested under the pipeline's parent run; their start and end
times are the measurement (stage process start-up, imports and MLflow logging included only
as far as they fall inside the run; the gap column shows the rest).
"""
from __future__ import annotations

import argparse

import pandas as pd

from unlearnops import tracking
from unlearnops.config import load_params


def stage_times(params: dict) -> tuple[pd.DataFrame, float]:
    mlflow = tracking.configure(params)
    runs = mlflow.search_runs(experiment_names=[params["mlflow"]["experiment"]], output_format="list", order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if r.data.tags.get("unlearnops.stage") == "pipeline" and r.info.end_time]
    if not parents:
        raise SystemExit("no finished `unlearnops repro` run in the MLflow store; run `make run` first")
    parent = parents[0]
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id), key=lambda r: r.info.start_time)
    rows, previous_end = [], parent.info.start_time
    for run in children:
        rows.append(
            {
                "stage": run.info.run_name,
                "seconds": (run.info.end_time - run.info.start_time) / 1000,
                "gap before [s]": (run.info.start_time - previous_end) / 1000,  # process start-up, imports, DVC
            }
        )
        previous_end = run.info.end_time
    total = (parent.info.end_time - parent.info.start_time) / 1000
    return pd.DataFrame(rows), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    table, total = stage_times(load_params(parser.parse_args().params))
    print(table.to_markdown(index=False, floatfmt=".1f"))
    print(f"\nstages: {table['seconds'].sum():.0f} s; gaps (start-up, DVC): {table['gap before [s]'].sum():.0f} s; whole run: {total:.0f} s")


if __name__ == "__main__":
    main()
