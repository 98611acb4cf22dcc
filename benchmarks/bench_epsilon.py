"""Benchmark: fast per-example epsilons vs the direct port of the released loop.

    python benchmarks/bench_epsilon.py [--quick]

Both run in this one process on the same synthetic confidences (N = 512 models per side,
as in the competition): first a few examples through both (and their largest difference),
then the fast version alone on a full forget set of 1,000 examples.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from unlearnops.metrics.epsilon import forget_quality, per_example_epsilons
from unlearnops.metrics.epsilon_reference import per_example_epsilons_reference

N_MODELS = 512


def synthetic_confidences(n_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """U and R [N_MODELS, n_examples]; each example gets its own shift and spread of U."""
    rng = np.random.default_rng(seed)
    shift = rng.uniform(0.0, 1.5, n_examples)
    spread = rng.uniform(0.5, 2.0, n_examples)
    retrained = rng.normal(0.0, 1.0, (N_MODELS, n_examples)) + 2.0
    unlearned = rng.normal(shift, spread, (N_MODELS, n_examples)) + 2.0
    return unlearned, retrained


def timed(fn, *args, repeats: int = 1, **kwargs):
    """(result, median wall seconds over `repeats` runs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 examples through the reference, 200 in the full run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_compare, n_full = (3, 200) if args.quick else (8, 1000)
    cpus = os.cpu_count() or 1
    # Timings on a shared machine depend on what else runs; print the load next to them.
    print(f"{cpus} CPUs, load average {os.getloadavg()[0]:.1f} at start")

    unlearned, retrained = synthetic_confidences(n_compare, args.seed)
    reference, t_ref = timed(per_example_epsilons_reference, unlearned, retrained)
    fast_1, t_fast_1 = timed(per_example_epsilons, unlearned, retrained, workers=1, repeats=3)
    fast_all, t_fast_all = timed(per_example_epsilons, unlearned, retrained, repeats=3)
    max_diff = max(np.abs(fast_1 - reference).max(), np.abs(fast_all - reference).max())
    rows = [
        ["reference port (1 run)", f"{1e3 * t_ref / n_compare:.1f}", "1.0"],
        ["fast, 1 thread (median of 3)", f"{1e3 * t_fast_1 / n_compare:.2f}", f"{t_ref / t_fast_1:.0f}"],
        [f"fast, {cpus} threads (median of 3)", f"{1e3 * t_fast_all / n_compare:.2f}", f"{t_ref / t_fast_all:.0f}"],
    ]
    print_table(
        f"N = {N_MODELS} models, {n_compare} examples, same inputs; max |fast - reference| = {max_diff:.1e}",
        ["version", "ms / example", "speedup"],
        rows,
    )

    unlearned, retrained = synthetic_confidences(n_full, args.seed + 1)
    rows = []
    for workers in sorted({1, cpus}):
        eps, seconds = timed(per_example_epsilons, unlearned, retrained, workers=workers)
        quality = forget_quality(eps, N_MODELS)["forget_quality"]
        rows.append([str(workers), f"{seconds:.2f}", f"{1e3 * seconds / n_full:.2f}", f"{quality:.4f}"])
    print_table(f"fast only: N = {N_MODELS} models x {n_full} examples", ["threads", "total s", "ms / example", "F"], rows)
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
