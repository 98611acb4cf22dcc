"""How a benchmark's runs are ranked, and which one `ops.method: auto` picks (imports nothing heavy).

The report (unlearnops.report) marks the run that the deletion flow's `auto` would use, and the
deletion flow (unlearnops.ops.deletion.choose_method) makes the choice: both read the rule here,
so the mark in the report is the choice the flow makes.

`auto` today: the highest Final estimate (`final_score`) among the benchmark's runs of
`ops.benchmark_setting` that are registered methods with hyperparameters in params.yaml `methods`
(a condensed run such as "a_amu+blend" is not a candidate: the flow does not condense).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path


def final_estimate(result: dict) -> float | None:
    """A run's Final as a number: `final_score` is a number or {"estimate", "low", "high", ...}; None if absent or not finite."""
    score = result.get("final_score")
    score = score.get("estimate") if isinstance(score, dict) else score
    if isinstance(score, (int, float)) and math.isfinite(score):
        return float(score)
    return None


def auto_candidates(results: dict[str, dict], params: dict, available: Iterable[str]) -> dict[str, float]:
    """name -> Final estimate of the runs `auto` may choose: a registered method (`available`) with
    hyperparameters in params.yaml `methods`, with a finite Final. `results`: run name -> its evidence
    (evaluation/<setting>/<run>.json; its "method" field, if any, names the run)."""
    available = set(available)
    scores = {}
    for key, result in results.items():
        name = result.get("method", key)
        score = final_estimate(result)
        if score is not None and name in available and name in (params.get("methods") or {}):
            scores[name] = score
    return scores


def read_results(evidence_dir: str | Path) -> dict[str, dict]:
    """run name -> evidence, from every <run>.json of a setting's evidence folder (sorted by name)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(evidence_dir).glob("*.json"))}


def auto_pick(scores: dict[str, float]) -> str | None:
    """The run `auto` picks among `auto_candidates`: the highest Final (ties: the first name in sorted order); None if none."""
    if not scores:
        return None
    return max(sorted(scores), key=lambda name: scores[name])


def auto_reason(scores: dict[str, float], where: str) -> str:
    best = auto_pick(scores)
    return f"best final_score {scores[best]:.4f} among {len(scores)} benchmarked methods ({where})"
