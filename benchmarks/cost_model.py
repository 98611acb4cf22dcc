"""Projected wall time and GPU-hours of the full benchmark grid at N = 512, in seed chunks on k workers.

    PYTHONPATH=. python benchmarks/cost_model.py [--params params.yaml] [--n-models 512] [--settings 4]
                                                 [--chunks 32 128 512] [--workers 1 8 32 64] [--skip-overhead]

The grid: every setting (`--settings`, default: params.yaml's) runs retrain and every unlearning
run (layout.run_names: the methods, Layered Unlearning, the Blend runs), each N models split into
chunks of `--chunks` seeds (runtime.chunk_models); every chunk is one task of flows/benchmark.py.
A chunk costs its models' time plus a fixed per-chunk overhead; the wall time on k workers is the
makespan of the chunks scheduled longest first on k identical workers (each worker takes the next
chunk when free, as Dask's scheduler does), so a grid whose chunks do not divide evenly over k pays
for its last, partly empty round. GPU-hours (device-hours) = the sum of all chunks' times.

Two tables, both from measured figures:

1. digits on CPU workers (what this machine runs): per-model seconds of retrain and of every run
   from the last `dvc repro` (metrics/<setting>/<run>.json `seconds_per_model`, mean over the
   settings present; N = 32, runtime.models_per_pass 64); the per-chunk overhead measured here
   (below).
2. CIFAR-10 ResNet-18 on H100s, PROJECTED, not measured here: retraining a model costs 30 epochs x
   1.24 s per model-epoch (benchmarks/README.md, `bench_training.py --gpu-resnet`, engine at N = 128
   on one H100: the 5.3 h of 512 retrained models); a run of a method costs that times the
   method's `time_vs_retrain` measured on digits (the assumption: methods keep their cost relative
   to retraining). Chunks of fewer than 128 models are charged the N = 128 rate, which flatters
   them (N = 1 ran at 12.55 s per model-epoch). Each worker also pays torch.compile once
   (55 s, benchmarks/README.md's compiled vmap step).

Per-chunk overhead (measured): a retrain chunk of one model on the default setting is computed
into a fresh local store and merged back (`chunks.run_chunk` + `chunks.load_chunk`: load the data,
evaluate, save, put, get); the overhead is that wall time minus the chunk's own training wall
time, the minimum over `--repeats`. Worker start-up (imports) is paid once per worker, not per
chunk (the flow's chunks run in the Dask worker's process). The stages that merge and evaluate
(relearning attack, membership inference, report) run on the orchestrating host and are not in
the tables.
"""
from __future__ import annotations

import argparse
import heapq
import json
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from unlearnops.config import load_params
from unlearnops.layout import METRICS, run_names, settings

H100_SECONDS_PER_MODEL_EPOCH = 1.24  # benchmarks/README.md: ResNet-18, CIFAR-10, engine at N = 128, one H100
H100_RETRAIN_EPOCHS = 30             # the README's target: 512 retrained ResNet-18s x 30 epochs
H100_COMPILE_SECONDS = 55.0          # benchmarks/README.md: torch.compile of the vmapped step, once per worker


def measured_seconds_per_model(params: dict) -> tuple[dict[str, float], list[str]]:
    """Mean per-model seconds of retrain and of every run over the settings with metrics in METRICS."""
    found: dict[str, list[float]] = {}
    present = [s for s in settings(params) if (METRICS / s / "retrain.json").is_file()]
    if not present:
        raise SystemExit(f"no {METRICS}/<setting>/retrain.json: run the benchmark first (make run)")
    for setting in present:
        for run in ["retrain", *run_names(params)]:
            path = METRICS / setting / f"{run}.json"
            if path.is_file():
                found.setdefault(run, []).append(float(json.loads(path.read_text())["seconds_per_model"]))
    missing = [run for run in ["retrain", *run_names(params)] if run not in found]
    if missing:
        raise SystemExit(f"no measured seconds_per_model for {', '.join(missing)} in {METRICS}/<setting>/")
    return {run: statistics.mean(times) for run, times in found.items()}, present


def chunk_overhead(params: dict, setting: str, repeats: int) -> float:
    """Seconds a chunk costs beyond its training: run_chunk + load_chunk of a one-model retrain chunk
    into a fresh store, minus the chunk's training wall time (minimum over `repeats`)."""
    import copy

    from unlearnops import chunks
    from unlearnops.store import Store

    p = copy.deepcopy(params)
    p["n_models"], p["runtime"]["chunk_models"] = 1, None
    p["runtime"]["models_per_pass"] = 1
    chunk = chunks.plan(p, setting, "retrain")[0]
    overheads = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            store = Store(str(Path(folder) / "store"))
            start = time.perf_counter()
            key = chunks.run_chunk(p, chunk, store)
            _, _, meta = chunks.load_chunk(store, key, chunk)
            overheads.append(time.perf_counter() - start - float(meta["wall_seconds"]))
    return min(overheads)


def makespan(durations: list[float], workers: int, per_worker: float = 0.0) -> float:
    """Wall time of `durations` on `workers` identical workers, longest first, each taking the next
    task when free (list scheduling); every worker that runs a task first pays `per_worker`."""
    free = [0.0] * min(workers, len(durations))
    heapq.heapify(free)
    for duration in sorted(durations, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + duration)
    return max(free) + per_worker


def grid_chunks(seconds_per_model: dict[str, float], n_settings: int, n_models: int, chunk: int, overhead: float) -> list[float]:
    """Every chunk's seconds: per setting, retrain and each run, N models in chunks of `chunk`."""
    sizes = [min(chunk, n_models - start) for start in range(0, n_models, chunk)]
    return [size * seconds + overhead for _ in range(n_settings) for seconds in seconds_per_model.values() for size in sizes]


def projection(seconds_per_model: dict[str, float], n_settings: int, n_models: int, chunks_: list[int], workers: list[int],
               overhead: float, per_worker: float) -> pd.DataFrame:
    rows = []
    for chunk in chunks_:
        durations = grid_chunks(seconds_per_model, n_settings, n_models, chunk, overhead)
        for k in workers:
            wall = makespan(durations, k, per_worker)
            device = sum(durations) + per_worker * min(k, len(durations))
            rows.append({"chunk_models": str(chunk), "chunks": str(len(durations)), "workers k": str(k), "wall [h]": wall / 3600,
                         "device-hours": device / 3600, "busy": device / (wall * k),
                         "ideal wall [h]": max(device / k, max(durations) + per_worker) / 3600})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--n-models", type=int, default=512)
    parser.add_argument("--settings", type=int, help="settings in the grid (default: params.yaml's)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 128, 512], help="runtime.chunk_models values")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=3, help="measurements of the per-chunk overhead (minimum)")
    parser.add_argument("--skip-overhead", type=float, metavar="SECONDS", help="use this per-chunk overhead instead of measuring it")
    args = parser.parse_args()
    params = load_params(args.params)
    cpu, present = measured_seconds_per_model(params)
    n_settings = args.settings or len(settings(params))
    overhead = args.skip_overhead if args.skip_overhead is not None else chunk_overhead(params, present[0], args.repeats)
    retrain = cpu["retrain"]
    print(f"grid: {n_settings} settings x (retrain + {len(cpu) - 1} runs) x N = {args.n_models}; "
          f"per-chunk overhead {overhead:.2f} s ({'given' if args.skip_overhead is not None else f'measured on {present[0]}'})\n")
    print("measured per-model seconds (CPU, digits, metrics of the last dvc repro) and the H100 projection:")
    gpu = {run: H100_SECONDS_PER_MODEL_EPOCH * H100_RETRAIN_EPOCHS * seconds / retrain for run, seconds in cpu.items()}
    per_run = pd.DataFrame({"CPU s/model (measured)": cpu, "x retrain": {r: s / retrain for r, s in cpu.items()},
                            "H100 s/model (projected)": gpu})
    print(per_run.to_markdown(floatfmt=".3f"))
    print("\n1. digits, CPU workers (measured per-model times and overhead):")
    print(projection(cpu, n_settings, args.n_models, args.chunks, args.workers, overhead, 0.0).to_markdown(index=False, floatfmt=".3f"))
    print("\n2. CIFAR-10 ResNet-18, H100 workers: PROJECTED from benchmarks/README.md's H100 figures (not measured here):")
    table = projection(gpu, n_settings, args.n_models, args.chunks, args.workers, overhead, H100_COMPILE_SECONDS)
    print(table.to_markdown(index=False, floatfmt=".2f"))
    print(f"\n(one setting's retrain alone at N = {args.n_models} on one H100: {args.n_models * gpu['retrain'] / 3600:.1f} h, "
          "the 5.3 h of benchmarks/README.md)")


if __name__ == "__main__":
    main()
