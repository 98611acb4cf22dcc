"""How often the deletion gates fail a candidate, by the true gap and the forget set's size.

The gates (unlearnops/ops/deletion.py `judge`) fail a candidate when the one-sided lower bound of
its gap to the reference is above the limit (unlearnops/metrics/gaps.py), where the old rule
failed it when the measured gap was. Simulated here with params.yaml's limits and confidence:

- forget accuracy: candidate and reference are right on each forget sample with probabilities
  p and p - gap (independently: the paired standard error is then widest);
- membership inference: the gate's loss AUC (forget vs test losses, `loss_auc`) on exponential
  losses; the reference's forget losses look like test losses (AUC 1/2) and the candidate's are
  scaled so that its AUC is 1/2 + gap; both models are scored against the same test losses.

A good rule fails a candidate at the limit at most 1 - confidence of the time and one well past
it nearly always; the fixed rule fails one at the limit about half the time on any size.
Run: python benchmarks/gate_error_rates.py   (about two minutes)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unlearnops.metrics.gaps import loss_auc, lower_bound, paired_accuracy_gap  # noqa: E402

REPS = 2000
N_TEST = 360  # digits' test split
SIZES = (8, 36, 150)


def accuracy_rates(limit: float, confidence: float, rng: np.random.Generator) -> list[dict]:
    rows = []
    for n in SIZES:
        for label, gap in (("0", 0.0), ("limit", limit), ("2 x limit", 2 * limit)):
            interval = fixed = 0
            for _ in range(REPS):
                reference = rng.random(n) < 0.95
                candidate = rng.random(n) < 0.95 - gap
                measured, se = paired_accuracy_gap(candidate, reference)
                interval += lower_bound(measured, se, confidence, n) > limit
                fixed += measured > limit
            rows.append({"gate": "forget_accuracy", "n forget": n, "true gap": label,
                         "fails (interval)": interval / REPS, "fails (fixed gap)": fixed / REPS})
    return rows


def scale_for_auc(auc: float) -> float:
    """Exponential losses: P(forget loss < test loss) = 1 / (1 + s) for forget scale s, test scale 1."""
    return 1 / auc - 1


def mia_rates(limit: float, confidence: float, n_test: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for n in SIZES:
        for label, gap in (("0", 0.0), ("limit", limit), ("1.5 x limit", min(1.5 * limit, 0.49))):
            interval = fixed = 0
            for _ in range(REPS):
                test = rng.exponential(1.0, n_test)
                auc_ref, se_ref = loss_auc(rng.exponential(1.0, n), test)
                auc_cand, se_cand = loss_auc(rng.exponential(scale_for_auc(0.5 + gap), n), test)
                measured, se = abs(auc_cand - auc_ref), float(np.hypot(se_cand, se_ref))
                interval += lower_bound(measured, se, confidence, n) > limit
                fixed += measured > limit
            rows.append({"gate": "mia", "n forget": n, "true gap": label,
                         "fails (interval)": interval / REPS, "fails (fixed gap)": fixed / REPS})
    return rows


def main() -> None:
    gates = yaml.safe_load(Path("params.yaml").read_text())["ops"]["gates"]
    rng = np.random.default_rng(0)
    rows = accuracy_rates(gates["max_forget_accuracy_gap"], gates["confidence"], rng)
    rows += mia_rates(gates["max_mia_auc_gap"], gates["confidence"], N_TEST, rng)
    print(f"Gate failure rates, {REPS} simulated candidates per row (±{1 / np.sqrt(REPS):.2f} at worst); "
          f"confidence {gates['confidence']}, limits {gates['max_forget_accuracy_gap']} (accuracy), {gates['max_mia_auc_gap']} (MIA AUC)\n")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
