"""How a benchmark's runs are ranked, and which one `ops.method: auto` picks (imports nothing heavy).

The report (unlearnops.report) marks the run that the deletion flow's `auto` would use, and the
deletion flow (unlearnops.ops.deletion.choose_method) makes the choice: both read the rule here,
so the mark in the report is the choice the flow makes.

`auto`: the highest Final estimate (`final_score`) among the benchmark's runs of
`ops.benchmark_setting` that are registered methods with hyperparameters in params.yaml `methods`
(a condensed run such as "a_amu+blend" is not a candidate: the flow does not condense) and that
meet the deletion gates' criteria (`ops.gates`) in the benchmark (`gate_failures`): a method that
would fail the gates in production is not picked for its Final.
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


def _mean(result: dict, *keys: str) -> float | None:
    for key in keys:
        result = result.get(key) if isinstance(result, dict) else None
    return float(result) if isinstance(result, (int, float)) else None


def gate_failures(result: dict, gates: dict) -> list[str]:
    """The deletion gates' criteria (params.yaml `ops.gates`) a benchmark run fails, on its means
    over N models against the retrained models': test and retain accuracy drop, forget accuracy
    gap, loss-attack AUC gap. A criterion the evidence lacks is not held against the run."""
    found = []
    for split, limit in (("test", "max_test_accuracy_drop"), ("retain", "max_retain_accuracy_drop")):
        run, retrained = _mean(result, "accuracy", split, "mean"), _mean(result, "retrain_accuracy", split, "mean")
        if run is not None and retrained is not None and retrained - run > gates[limit]:
            found.append(f"{split} accuracy {retrained - run:.3f} below retrain's (> {gates[limit]:g})")
    pairs = ((("accuracy", "forget", "mean"), ("retrain_accuracy", "forget", "mean"), "forget accuracy", "max_forget_accuracy_gap"),
             (("mia", "loss_attack_auc"), ("retrain_mia", "loss_attack_auc"), "loss-attack AUC", "max_mia_auc_gap"))
    for run_keys, retrain_keys, what, limit in pairs:
        run, retrained = _mean(result, *run_keys), _mean(result, *retrain_keys)
        if run is not None and retrained is not None and abs(run - retrained) > gates[limit]:
            found.append(f"{what} {abs(run - retrained):.3f} from retrain's (> {gates[limit]:g})")
    return found


def auto_candidates(results: dict[str, dict], params: dict, available: Iterable[str]) -> dict[str, float]:
    """name -> Final estimate of the runs `auto` may choose: a registered method (`available`) with
    hyperparameters in params.yaml `methods`, with a finite Final, that meets the gates' criteria
    (`gate_failures`). `results`: run name -> its evidence (evaluation/<setting>/<run>.json; its
    "method" field, if any, names the run)."""
    available = set(available)
    gates = params["ops"]["gates"]
    scores = {}
    for key, result in results.items():
        name = result.get("method", key)
        score = final_estimate(result)
        if score is not None and name in available and name in (params.get("methods") or {}) \
                and not gate_failures(result, gates):
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
    return f"best final_score {scores[best]:.4f} among {len(scores)} benchmarked methods that meet the gates' criteria ({where})"
