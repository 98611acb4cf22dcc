"""Wall time of the last `unlearnops repro` (make run), per stage, from its MLflow runs; and
(`--startup`) what a stage process pays before and around its work.

    PYTHONPATH=. python benchmarks/pipeline_stage_times.py [--params params.yaml]
    PYTHONPATH=. python benchmarks/pipeline_stage_times.py --startup [--repeats 3]

Every stage is one MLflow run nested under the pipeline's parent run; their start and end
times are the measurement (stage process start-up, imports and MLflow logging included only
as far as they fall inside the run; the gap column shows the rest).

`--startup` runs, in fresh processes, each fixed cost of a stage one after another and prints
the minimum over repeats of its CPU time (user + system: CPU time, unlike wall time, barely
changes when other processes share the cores): the interpreter, the imports of an unlearn stage,
MLflow (import, store, one run with params and metrics), a second MLflow run in the same
process, logging one small model, and a spooled run (tracking.SpooledRun). The PYTHONPATH
chooses the code measured (older code has no spooled run: that phase is then left out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

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


# One stage process's fixed costs, in order; each phase's CPU seconds are printed as JSON.
PROBE = """
import json, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
phases, last = {}, 0.0  # from the process's start
def phase(name):
    global last
    now = cpu(); phases[name] = now - last; last = now
phase("interpreter")
import yaml
from unlearnops import cli, evaluation, methods, pipeline, training
phase("imports of an unlearn stage (torch, scikit-learn, ...)")
from unlearnops import tracking
params = yaml.safe_load(open(sys.argv[1]))
params["mlflow"].update(tracking_uri="sqlite:///mlflow.db", artifact_root="mlartifacts")
with tracking.stage_run(params, "probe", {"method": params["methods"]["finetune"]}) as (mlflow, run):
    mlflow.log_metrics({"a": 1.0})
phase("MLflow: import, store, one run")
with tracking.stage_run(params, "probe", {"method": params["methods"]["finetune"]}) as (mlflow, run):
    mlflow.log_metrics({"a": 1.0})
    phase("a second MLflow run in the same process")
    import torch
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    tracking.log_model(mlflow, net, torch.zeros(2, 1, 8, 8).numpy())
phase("logging one small model (mlflow.pytorch.log_model)")
if hasattr(tracking, "SPOOL_ENV"):
    import os
    os.environ[tracking.SPOOL_ENV] = "spool"
    with tracking.stage_run(params, "probe", {"method": params["methods"]["finetune"]}) as (logger, run):
        logger.log_metrics({"a": 1.0})
    phase("a spooled run (what a stage pays under unlearnops repro)")
print(json.dumps(phases))
"""


def startup_costs(params_path: str, repeats: int) -> pd.DataFrame:
    """Minimum CPU seconds of each phase of PROBE over `repeats` fresh processes, after one that
    creates the MLflow store (a pipeline's stages find theirs existing)."""
    runs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats + 1):
            done = subprocess.run([sys.executable, "-c", PROBE, os.path.abspath(params_path)], cwd=folder, env=env,
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    runs = runs[1:]
    table = pd.DataFrame(runs).min().rename("min CPU [s]").rename_axis("phase").reset_index()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--startup", action="store_true", help="measure a stage process's fixed costs instead")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.startup:
        print(startup_costs(args.params, args.repeats).to_markdown(index=False, floatfmt=".2f"))
        return
    table, total = stage_times(load_params(args.params))
    print(table.to_markdown(index=False, floatfmt=".1f"))
    print(f"\nstages: {table['seconds'].sum():.0f} s; gaps (start-up, DVC): {table['gap before [s]'].sum():.0f} s; whole run: {total:.0f} s")


if __name__ == "__main__":
    main()
