"""Coverage of the F interval (epsilon.mean_interval), measured by simulation, and how F depends on N.

    PYTHONPATH=. python benchmarks/interval_coverage.py [--draws 500] [--workers 1]

Setup (params.yaml `benchmarks.interval_coverage`): synthetic logit-scaled confidences, N fixed
models per side. Example x has a mean confidence mu_x and a spread s_x; model m adds its own offset
a_m (so the models are fixed and differ); retrained R[m, x] = mu_x + a_m + s_x e, unlearned
U[m, x] = mu_x + shift_x + a'_m + s_x e', with shift_x = 0 except for a scenario's fraction of
examples. Each scenario scores a population of examples once with the real metric
(per_example_epsilons, forget_quality); the population's mean point is the true F given these
models. Forget sets are drawn from the population with replacement (so the examples are i.i.d.
and the truth is exact), each gets an interval, and coverage is the fraction of intervals that
hold the truth (nominal: evaluate.interval_level; with `draws` forget sets the Monte Carlo error of
a 95% coverage is about 1 point at 2 SE). For comparison, the same forget sets also get a plain
Student-t interval and a percentile bootstrap over examples.

Second table: F of the same examples scored with N = 8 ... 128 models per side on disjoint model
subsets (mean and spread over subsets), beside the example interval's half-width. F depends on N
(more models: more bins and stronger attacks), and the interval does not cover that, nor the
spread between model subsets: a figure that depends on the number of models says so.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unlearnops.config import build_dataclass, load_params, section  # noqa: E402
from unlearnops.metrics.epsilon import forget_quality, mean_interval, per_example_epsilons  # noqa: E402


@dataclass
class CoverageSetup:
    seed: int
    n_models: int  # N per side
    population: int  # examples per scenario; their mean point is the true F
    forget_sizes: list[int]  # forget-set sizes drawn from the population
    draws: int  # forget sets per (scenario, size)
    bootstrap_resamples: int  # of the percentile bootstrap shown for comparison
    example_mean: list[float]  # [mean, sd] of the per-example mean confidence
    example_spread: list[float]  # [low, high] of the per-example spread over models
    model_offset_sd: float  # sd of each model's offset
    scenarios: dict[str, list[float]]  # name -> [fraction shifted, shift mean, shift sd]
    n_models_curve: list[int]  # N values of the second table
    curve_examples: int
    curve_subsets: int  # at most this many disjoint model subsets per N


def confidences(cfg: CoverageSetup, scenario: list[float], n_examples: int, n_models: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Unlearned and retrained confidences [n_models, n_examples] of one scenario."""
    fraction, shift_mean, shift_sd = scenario
    mean = rng.normal(*cfg.example_mean, n_examples)
    spread = rng.uniform(*cfg.example_spread, n_examples)
    shift = np.where(rng.random(n_examples) < fraction, rng.normal(shift_mean, shift_sd, n_examples), 0.0)
    offset_u, offset_r = rng.normal(0.0, cfg.model_offset_sd, (2, n_models, 1))
    retrained = mean + offset_r + spread * rng.standard_normal((n_models, n_examples))
    unlearned = mean + shift + offset_u + spread * rng.standard_normal((n_models, n_examples))
    return unlearned, retrained


def points_of(unlearned, retrained, workers: int) -> np.ndarray:
    eps = per_example_epsilons(unlearned, retrained, workers=workers)
    return forget_quality(eps, unlearned.shape[0])["per_example_points"]


def comparison_intervals(points: np.ndarray, level: float, resamples: int, rng) -> dict[str, tuple[float, float]]:
    """Plain Student t and percentile bootstrap over examples; points take few distinct values, so
    a bootstrap resample is a multinomial draw of counts of those values."""
    n, mean = points.size, points.mean()
    half = stats.t.ppf((1 + level) / 2, n - 1) * points.std(ddof=1) / np.sqrt(n)
    values, counts = np.unique(points, return_counts=True)
    resampled_means = rng.multinomial(n, counts / n, size=resamples) @ values / n
    tail = (1 - level) / 2
    return {
        "plain t": (max(mean - half, 0.0), min(mean + half, 1.0)),
        "percentile bootstrap": tuple(np.quantile(resampled_means, [tail, 1 - tail])),
    }


def coverage_table(cfg: CoverageSetup, level: float, workers: int) -> pd.DataFrame:
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for name, scenario in cfg.scenarios.items():
        population = points_of(*confidences(cfg, scenario, cfg.population, cfg.n_models, rng), workers)
        truth = population.mean()
        for size in cfg.forget_sizes:
            held = {"logit t (used)": [], "plain t": [], "percentile bootstrap": []}
            below = above = width = 0.0
            for _ in range(cfg.draws):
                sample = rng.choice(population, size)
                low, high = mean_interval(sample, level)
                below, above, width = below + (truth < low), above + (truth > high), width + high - low
                held["logit t (used)"].append(low <= truth <= high)
                for method, (lo, hi) in comparison_intervals(sample, level, cfg.bootstrap_resamples, rng).items():
                    held[method].append(lo <= truth <= hi)
            rows.append({
                "scenario": name, "true F": truth, "forget size": size,
                **{f"coverage % {m}": 100 * np.mean(h) for m, h in held.items()},
                "% truth below / above": f"{100 * below / cfg.draws:.1f} / {100 * above / cfg.draws:.1f}",
                "mean width": width / cfg.draws,
            })
    return pd.DataFrame(rows)


def n_models_table(cfg: CoverageSetup, level: float, workers: int) -> pd.DataFrame:
    rng = np.random.default_rng(cfg.seed + 1)
    rows = []
    for name, scenario in cfg.scenarios.items():
        unlearned, retrained = confidences(cfg, scenario, cfg.curve_examples, max(cfg.n_models_curve), rng)
        for n in cfg.n_models_curve:
            subsets = [slice(j * n, (j + 1) * n) for j in range(min(cfg.curve_subsets, unlearned.shape[0] // n))]
            points = [points_of(unlearned[s], retrained[s], workers) for s in subsets]
            scores = [p.mean() for p in points]
            intervals = [mean_interval(p, level) for p in points]
            rows.append({
                "scenario": name, "N": n, "model subsets": len(subsets), "F (mean over subsets)": np.mean(scores),
                "F spread over subsets (sd)": np.std(scores, ddof=1) if len(scores) > 1 else np.nan,
                "example interval half-width": np.mean([(high - low) / 2 for low, high in intervals]),
            })
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--draws", type=int, help="override benchmarks.interval_coverage.draws")
    parser.add_argument("--workers", type=int, default=1, help="threads of per_example_epsilons")
    args = parser.parse_args()
    params = load_params(args.params)
    values = section(params, "benchmarks.interval_coverage")
    cfg = build_dataclass(CoverageSetup, {**values, **({"draws": args.draws} if args.draws else {})}, "benchmarks.interval_coverage")
    level = float(section(params, "evaluate.interval_level"))

    start = time.perf_counter()
    coverage = coverage_table(cfg, level, args.workers)
    print(f"Coverage of the {level:.0%} F interval: N = {cfg.n_models} fixed models per side, population of "
          f"{cfg.population} examples per scenario, {cfg.draws} forget sets per row")
    print(coverage.to_markdown(index=False, floatfmt=".4f"))
    curve = n_models_table(cfg, level, args.workers)
    print(f"\nF against the number of models per side ({cfg.curve_examples} examples; disjoint model subsets)")
    print(curve.to_markdown(index=False, floatfmt=".4f"))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
