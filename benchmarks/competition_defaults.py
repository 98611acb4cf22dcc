"""The competition's top five with params.yaml's defaults on the default setting, side by side
with retraining: accuracy, forget confidence and time as a fraction of the retrain time.

Prepares the default data (digits, the default forget set), trains the target with `train.fit`,
retrains N models on retain (`retrain.seed`), then runs every method N times from the target
(`unlearn.seed`), all in one process on the same runtime, so the time fractions compare like
with like. Two fractions: wall time (what the pipeline reports) and the process's CPU time (with
one thread, hardly moved by other processes on a busy machine). The retraining is timed before
and after the methods, and the fractions use the mean of the two. "forget conf" is the mean over
models and forget samples of the competition's logit-scaled confidence log(p_y / (1 - p_y)).

    PYTHONPATH=. python benchmarks/competition_defaults.py [--n 8] [--methods kl_contrastive ...]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from unlearnops import data as data_lib
from unlearnops.methods import UnlearnData, get_method
from unlearnops.metrics.epsilon import logit_scaled_confidence
from unlearnops.nets import model_spec
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, Runtime, Stream, predict, train_from_scratch

METHODS = ["kl_contrastive", "grad_reinit", "conv_perturb", "prune_reinit", "conv_transpose", "conv_transpose_pseudo"]


def summary(stack: ModelStack, data, runtime: Runtime) -> dict:
    row = {}
    for part in ("retain", "forget", "test"):
        logits = predict(stack, data[part].x, runtime)
        row[f"{part} acc"] = float((logits.argmax(-1) == data[part].y).float().mean())
        if part == "forget":
            row["forget conf"] = float(logit_scaled_confidence(logits.numpy(), data[part].y.numpy()).mean())
    return row


def timed(run):
    """(run(), wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="models per method and retrained models")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["runtime"]["threads"] = args.threads
    runtime = Runtime.from_params(params)
    with tempfile.TemporaryDirectory() as tmp:
        params["data"]["deleted"] = str(Path(tmp) / "deleted.csv")
        data_lib.prepare(params, Path(tmp))
        data = data_lib.load_prepared(Path(tmp))
    spec = model_spec(params, data.num_classes, data.in_channels, data.image_size)
    cfg = FitConfig(**params["train"]["fit"])
    target, _ = train_from_scratch(spec, [int(params["train"]["seed"])], Stream(data["train"].x, data["train"].y, cfg.batch_size), cfg, runtime, "target")
    retrain_seeds = [int(params["retrain"]["seed"]) + i for i in range(args.n)]
    retain_stream = Stream(data["retain"].x, data["retain"].y, cfg.batch_size)
    retrained, retrain_before, retrain_cpu_before = timed(lambda: train_from_scratch(spec, retrain_seeds, retain_stream, cfg, runtime, "retrain")[0])
    unlearn_data = UnlearnData(data["retain"], data["forget"], data["val"], data.num_classes, augment=False)
    rows = {"target": {**summary(target, data, runtime), "time / retrain": float("nan"), "cpu / retrain": float("nan")}}
    rows["retrain"] = {**summary(retrained, data, runtime), "time / retrain": 1.0, "cpu / retrain": 1.0}
    unlearn_seeds = [int(params["unlearn"]["seed"]) + i for i in range(args.n)]
    seconds = {}
    for name in args.methods:
        method = get_method(name, params)
        unlearned, wall, cpu = timed(lambda: method.unlearn(ModelStack.replicate(target, unlearn_seeds), unlearn_data, runtime))
        seconds[name] = wall, cpu
        rows[name] = summary(unlearned, data, runtime)
        print(name, rows[name], f"{wall:.1f} s, cpu {cpu:.1f} s", flush=True)
    _, retrain_after, retrain_cpu_after = timed(lambda: train_from_scratch(spec, retrain_seeds, retain_stream, cfg, runtime, "retrain")[0])
    retrain_time, retrain_cpu = (retrain_before + retrain_after) / 2, (retrain_cpu_before + retrain_cpu_after) / 2
    for name, (wall, cpu) in seconds.items():
        rows[name]["time / retrain"] = wall / retrain_time
        rows[name]["cpu / retrain"] = cpu / retrain_cpu
    table = pd.DataFrame(rows).T
    print(f"\nN = {args.n}, {args.threads} thread(s); retrain {retrain_before:.1f} s before the methods, {retrain_after:.1f} s after (CPU {retrain_cpu:.1f} s)\n")
    print(table.to_markdown(floatfmt=".3f"))


if __name__ == "__main__":
    main()
