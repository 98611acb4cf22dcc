"""Benchmark: what splitting a stage into seed chunks costs (unlearnops/chunks.py).

    PYTHONPATH=. python benchmarks/chunk_overhead.py [--setting digits-random-2] [--n 8] [--chunk 4] [--runs retrain finetune a_amu+blend]

Run in a working copy that holds the setting's upstream outputs (data/split, data/prepared,
models/<dataset>/target: `dvc repro train_target prepare`). With params.yaml's defaults except
n_models = --n and models_per_pass = --chunk (so the chunks keep the engine's passes), each run
(retrain, or a method, `+blend` for a condensed one) is assembled four ways: in one chunk, in
chunks of --chunk in this process, through a fresh local-folder store, and again from that store
(everything stored). The table gives each way's wall time, the sum of its chunks' own times (the
stage's `wall_seconds`), the difference (loading data per chunk, writing and reading the store),
and whether its models and logits equal the one-chunk run's bit for bit.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import numpy as np
import torch
from tabulate import tabulate

from unlearnops import chunks
from unlearnops.params_schema import load_checked_params
from unlearnops.store import Store


def same(a, b) -> bool:
    (stack_a, out_a), (stack_b, out_b) = a, b
    weights = all(torch.equal(stack_a.params[k], stack_b.params[k]) for k in stack_a.params)
    return weights and all(np.array_equal(out_a.logits[s], out_b.logits[s]) for s in out_a.logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="digits-random-2")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--runs", nargs="+", default=["retrain", "finetune", "a_amu+blend"])
    args = parser.parse_args()
    params = load_checked_params(os.environ.get("UNLEARNOPS_PARAMS", "params.yaml"))
    params["n_models"] = args.n
    params["runtime"]["models_per_pass"] = args.chunk
    chunked = copy.deepcopy(params)
    chunked["runtime"]["chunk_models"] = args.chunk
    rows = []
    for run in args.runs:
        method, _, condense = run.partition("+")
        stage = ("retrain",) if run == "retrain" else ("unlearn", method, condense or None)
        with tempfile.TemporaryDirectory(prefix="chunk-store-") as folder:
            store = Store(folder)
            ways = [("one chunk", params, None), (f"chunks of {args.chunk}", chunked, None),
                    (f"chunks of {args.chunk}, local store", chunked, store), ("again, all stored", chunked, store)]
            reference = None
            for label, p, where in ways:
                start = time.perf_counter()
                result = chunks.assemble(p, args.setting, *stage, store=where)
                wall = time.perf_counter() - start
                reference = reference or result
                rows.append([run, label, f"{wall:.1f}", f"{result[1].wall_seconds:.1f}", f"{wall - result[1].wall_seconds:+.1f}", same(result, reference)])
    print(f"{args.setting}, N = {args.n}, models_per_pass = {args.chunk}, torch threads = {torch.get_num_threads()}")
    print(tabulate(rows, headers=["run", "how", "wall s", "sum of chunk walls s", "difference s", "equal to one chunk"]))


if __name__ == "__main__":
    main()
