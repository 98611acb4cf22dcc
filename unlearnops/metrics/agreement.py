"""Agreement of an unlearned model with retraining (MUSO / SalUn "Avg. Gap", JS divergence)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.spatial.distance import jensenshannon


def accuracy_gaps(acc_unlearned: Mapping, acc_retrained: Mapping) -> dict:
    """Per-split |unlearned - retrained| and their mean, the "average gap" of MUSO and SalUn.

    Values are scalars or per-model arrays (averaged first). Any splits may be given, e.g.
    forget / retain / test accuracy and MIA-efficacy; the forget-accuracy gap equals the
    papers' unlearning-accuracy gap, since |(1 - a) - (1 - b)| = |a - b|.
    """
    if set(acc_unlearned) != set(acc_retrained):
        raise ValueError(f"splits differ: unlearned has {sorted(acc_unlearned)}, retrained has {sorted(acc_retrained)}")
    if not acc_unlearned:
        raise ValueError("no splits given")
    gaps = {split: abs(float(np.mean(acc_unlearned[split])) - float(np.mean(acc_retrained[split]))) for split in acc_unlearned}
    return {"gaps": gaps, "average_gap": float(np.mean(list(gaps.values())))}


def js_divergence_per_example(conf_unlearned, conf_retrained, bins: int = 20) -> np.ndarray:
    """Jensen-Shannon divergence (base 2, so in [0, 1]) between U and R per forget example.

    Inputs are confidences [N_models, n_examples] (N may differ between U and R). Each
    example's values from both sides go into `bins` equal-width bins on their shared
    [min, max]; the divergence is scipy's Jensen-Shannon distance squared.
    """
    u = np.asarray(conf_unlearned, dtype=np.float64)
    r = np.asarray(conf_retrained, dtype=np.float64)
    if u.ndim != 2 or r.ndim != 2 or u.shape[1] != r.shape[1]:
        raise ValueError(f"need [N_models, n_examples] arrays with the same n_examples; got {u.shape} and {r.shape}")
    if not (np.isfinite(u).all() and np.isfinite(r).all()):
        raise ValueError("confidences contain NaN or inf")
    if bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins}")
    low = np.minimum(u.min(axis=0), r.min(axis=0))
    width = np.maximum(u.max(axis=0), r.max(axis=0)) - low
    width[width == 0] = 1.0  # every value equal: all fall in bin 0, divergence 0

    def histogram(values):  # [n_examples, bins], each row a probability vector
        index = np.clip(((values - low) / width * bins).astype(int), 0, bins - 1)  # max -> last bin
        flat = index + bins * np.arange(values.shape[1])
        return np.bincount(flat.ravel(), minlength=bins * values.shape[1]).reshape(-1, bins) / values.shape[0]

    return jensenshannon(histogram(u), histogram(r), axis=1, base=2) ** 2
