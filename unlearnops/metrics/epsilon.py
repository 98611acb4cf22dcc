"""The NeurIPS 2023 Machine Unlearning competition score, vectorised.

Spec: docs/metric.md, section 1 (the organisers' write-up and their
released `metric.py`). Pipeline:

    logits --logit_scaled_confidence--> confidences [N_models, n_examples]
    (unlearned U, retrained R) --per_example_epsilons--> epsilon per forget example
    epsilons --forget_quality--> F;   F and accuracies --final_score--> Final
    epsilons and accuracies --scores_with_intervals--> F and Final with intervals over forget examples

`epsilon_reference.py` holds a direct, slow port of the released per-example loop; both
files build their threshold grids with the helpers below so that they test the exact same
thresholds. The fast version gets every false-positive / false-negative count from sorted
model values with `np.searchsorted` instead of comparing every model with every threshold.

Where the released code and this module differ (all documented at the point of use):
- grids are float64 `np.linspace` (the released single-threshold grid is a float32
  `torch.linspace`, so a value lying exactly on a grid point may count differently there);
- rates are float64 counts / N (the released code averages in float32 on the GPU);
- if every threshold is discarded, epsilon is 0 (the released code fails an assert; this
  happens when U and R are the same point mass, e.g. saturated softmax in every model);
- if both ranges are 0, the range-ratio rule does not fire (0/0 is NaN, and NaN < 0.01 is
  false in the released code too), so e.g. two different constants score 50 by perfect
  separation and two equal constants score 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import special, stats

from unlearnops.files import write_json

DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100
INTERVAL_BUFFER = 2.0  # how far interval ends may move around the positive distribution
PEAKY_RANGE_RATIO = 0.01  # smaller range / larger range below this -> epsilon = cap
BIN_WIDTH = 0.5
LOG_FLOOR = 1e-45  # added inside each log of the logit-scaled confidence
_CHUNK = 256  # examples prepared at once (2N sorted values and counts each)
# Not in the spec: a guard against grids too large for memory. Logit-scaled confidences
# span at most 2 * -ln(1e-45) = 207 units per example (20,700 single thresholds).
MAX_VALUE_RANGE = 1000.0

ACCURACY_KEYS = ("retain_unlearned", "retain_retrained", "test_unlearned", "test_retrained")


# --------------------------------------------------------------------------------------
# Confidences


def logit_scaled_confidence(logits, labels) -> np.ndarray:
    """log(p_y) - log(sum_{j != y} p_j) from logits [..., n_examples, C] and labels [n_examples].

    Softmax after subtracting the row max, in float64; 1e-45 inside each log (spec, section 1).
    The wrong-class mass is summed directly rather than taken as 1 - p_y, which would lose
    all precision when p_y is close to 1.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim < 2:
        raise ValueError(f"logits must have shape [..., n_examples, C]; got ndim={logits.ndim}")
    n_examples, n_classes = logits.shape[-2:]
    _check_labels(labels, n_examples, n_classes)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    is_label = np.arange(n_classes) == labels[:, None]  # [n_examples, C]
    p_correct = np.where(is_label, probs, 0.0).sum(axis=-1)
    p_wrong = np.where(is_label, 0.0, probs).sum(axis=-1)
    return np.log(p_correct + LOG_FLOOR) - np.log(p_wrong + LOG_FLOOR)


def _check_labels(labels: np.ndarray, n_examples: int, n_classes: int) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [n_examples]; got ndim={labels.ndim}")
    if labels.shape[0] != n_examples:
        raise ValueError(f"labels has {labels.shape[0]} entries but the logits have {n_examples} examples")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers; got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"labels out of range: values must lie in [0, {n_classes - 1}], "
            f"got min {labels.min()} and max {labels.max()}"
        )


# --------------------------------------------------------------------------------------
# Threshold grids, shared with epsilon_reference.py


def single_threshold_grid(low: float, high: float) -> np.ndarray:
    """Thresholds for "value >= t": 100 per unit over [low, high] of all U and R values.

    Count = ceil(range * 100), as in the released code (which uses torch.linspace in float32;
    float64 np.linspace here). A zero range gives an empty grid.
    """
    count = int(np.ceil((high - low) * THRESHOLDS_PER_UNIT))
    return np.linspace(low, high, count)


def double_threshold_grid(pos_min: float, pos_max: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Interval attacks [left, right] around the narrower ("positive") distribution.

    Right ends: 100 per unit from pos_min + width - 2 to pos_max + 2 (400 or 401 of them, as
    width is the positive range, so the span is 4 up to rounding). For each right end tr: 400
    left ends from tr - width - 2 to tr - width + 2; about 160,000 pairs in all.
    Returns right [n_right] and left [n_right, 400]. A left end above its right end is an
    empty interval, kept as in the released code (its threshold is discarded later).
    """
    low = pos_min + width - INTERVAL_BUFFER
    high = pos_max + INTERVAL_BUFFER
    right = np.linspace(low, high, int(np.ceil((high - low) * THRESHOLDS_PER_UNIT)))
    n_left = int(np.ceil(2 * INTERVAL_BUFFER * THRESHOLDS_PER_UNIT))
    # np.linspace with array ends gives, row by row, the same floats as one call per right end.
    left = np.linspace(right - width - INTERVAL_BUFFER, right - width + INTERVAL_BUFFER, n_left, axis=-1)
    return right, left


# --------------------------------------------------------------------------------------
# Per-example epsilons


def _check_confidences(unlearned, retrained) -> tuple[np.ndarray, np.ndarray]:
    unlearned = np.asarray(unlearned, dtype=np.float64)
    retrained = np.asarray(retrained, dtype=np.float64)
    for name, arr in (("unlearned", unlearned), ("retrained", retrained)):
        if arr.ndim != 2:
            raise ValueError(f"{name} confidences must be 2-D [N_models, n_examples]; got ndim={arr.ndim}")
    if unlearned.shape != retrained.shape:
        raise ValueError(
            f"unlearned and retrained confidences must have the same shape [N_models, n_examples] "
            f"(the competition uses equal N for both); got {unlearned.shape} and {retrained.shape}"
        )
    n_models, n_examples = unlearned.shape
    if n_models < 2:
        raise ValueError(f"need at least 2 models per side; got {n_models}")
    if n_examples == 0:
        raise ValueError("the forget set is empty (0 examples)")
    for name, arr in (("unlearned", unlearned), ("retrained", retrained)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} confidences contain NaN or inf ({np.size(arr) - np.isfinite(arr).sum()} values)")
    spread = np.maximum(unlearned.max(axis=0), retrained.max(axis=0)) - np.minimum(unlearned.min(axis=0), retrained.min(axis=0))
    if spread.max() > MAX_VALUE_RANGE:
        raise ValueError(
            f"example {int(spread.argmax())} spans {spread.max():.4g} units; at 100 thresholds per unit the grid "
            f"would not fit in memory (limit {MAX_VALUE_RANGE}). Logit-scaled confidences lie within "
            f"+-{-np.log(LOG_FLOOR):.1f}; were these computed some other way?"
        )
    return unlearned, retrained


@lru_cache(maxsize=8)  # ranking runs rescore with the same N many times
def _epsilon_table(n_models: int, delta: float) -> np.ndarray:
    """Epsilon of one threshold for every (false-positive count, false-negative count).

    Rates are count / N, as the mean over models of 0/1 predictions. Per the spec: both zero
    -> inf (perfect attack); exactly one zero -> discarded; otherwise
    max(log(1-delta-FPR) - log(FNR), log(1-delta-FNR) - log(FPR)) floored at 0, where a
    NaN term (log of a negative) is ignored and two NaN terms discard the threshold
    (np.nanmax in the released code). Discarded entries are -inf so a max never picks them.
    """
    rates = np.arange(n_models + 1) / n_models
    fpr, fnr = rates[:, None], rates[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.fmax(np.log(1 - delta - fpr) - np.log(fnr), np.log(1 - delta - fnr) - np.log(fpr))
    eps = np.clip(eps, 0.0, None)
    eps[(fpr == 0) | (fnr == 0)] = np.nan
    eps[0, 0] = np.inf
    eps[np.isnan(eps)] = -np.inf
    eps.flags.writeable = False  # shared through the cache
    return eps


def _example_epsilon(merged: np.ndarray, pos_before: np.ndarray, pos_span, neg_span, table: np.ndarray) -> float:
    """Best epsilon over both attack families for one example.

    merged: the 2N values of both sides, sorted. pos_before[g]: how many positive-side values
    are among merged[:g]. pos_span / neg_span: (min, max) of each side. For any threshold t,
    g = #(values < t) (one searchsorted) then gives both sides' counts below t: this holds
    with ties too, since equal values are all below t or all not. Each attack's
    (false positives, false negatives) becomes a flat index fp * (N + 1) + fn into `table`.
    """
    n_models = merged.size // 2
    below = np.arange(2 * n_models + 1)  # g, values in merged[:g]
    flat = table.reshape(-1)

    # Single threshold, predict positive when value >= t:
    # fn = positives < t = pos_before[g]; fp = negatives >= t = N - (g - pos_before[g]).
    thresholds = single_threshold_grid(merged[0], merged[-1])
    g = np.searchsorted(merged, thresholds, side="left")
    single_index = (n_models - below + pos_before) * (n_models + 1) + pos_before
    best = flat[single_index[g]].max(initial=-np.inf)

    # Double threshold: the narrower side is positive (the other side when ranges tie, as in
    # the released swap `if pos_diff >= neg_diff`); predict positive when left <= value <= right.
    pos_range, neg_range = pos_span[1] - pos_span[0], neg_span[1] - neg_span[0]
    narrow_span, narrow_before = (neg_span, below - pos_before) if pos_range >= neg_range else (pos_span, pos_before)
    right, left = double_threshold_grid(narrow_span[0], narrow_span[1], min(pos_range, neg_range))
    g_right = np.searchsorted(merged, right, side="right")  # values <= right
    # values < left; capped at g_right so that an empty interval (left > right) holds nothing.
    g_left = np.minimum(np.searchsorted(merged, left, side="left"), g_right[:, None])
    # Inside counts are differences of "before" counts, so with
    # key[g] = wide_before[g] * (N + 1) - narrow_before[g], the attack's flat index
    # fp * (N + 1) + fn  (fp = wide inside, fn = N - narrow inside) is key[g_r] + N - key[g_l].
    key = (below - narrow_before) * (n_models + 1) - narrow_before
    double_index = (key[g_right] + n_models)[:, None] - key[g_left]
    best = max(best, flat[double_index].max(initial=-np.inf))

    # No kept threshold at all: the released code asserts; it only happens when no attack in
    # either family tells U from R (e.g. both the same constant), so epsilon is 0.
    return float(np.clip(best, 0.0, EPSILON_CAP)) if best > -np.inf else 0.0


def _prepare_chunk(unlearned: np.ndarray, retrained: np.ndarray):
    """Per-example inputs of `_example_epsilon` for the examples that the range rule leaves."""
    n_models = unlearned.shape[0]
    retrain_is_positive = np.median(retrained, axis=0) > np.median(unlearned, axis=0)
    pos = np.where(retrain_is_positive, retrained, unlearned).T  # [examples, N]
    neg = np.where(retrain_is_positive, unlearned, retrained).T
    pos_span = np.stack([pos.min(axis=1), pos.max(axis=1)], axis=1)
    neg_span = np.stack([neg.min(axis=1), neg.max(axis=1)], axis=1)

    ranges = np.stack([pos_span[:, 1] - pos_span[:, 0], neg_span[:, 1] - neg_span[:, 0]])
    with np.errstate(divide="ignore", invalid="ignore"):
        peaky = ranges.min(axis=0) / ranges.max(axis=0) < PEAKY_RANGE_RATIO  # 0/0 -> NaN -> False

    both = np.concatenate([pos, neg], axis=1)  # positive side in columns [0, N)
    order = np.argsort(both, axis=1, kind="stable")
    merged = np.take_along_axis(both, order, axis=1)
    pos_before = np.zeros((both.shape[0], 2 * n_models + 1), dtype=np.int64)
    np.cumsum(order < n_models, axis=1, out=pos_before[:, 1:])
    todo = np.flatnonzero(~peaky)
    return todo, [(merged[i], pos_before[i], pos_span[i], neg_span[i]) for i in todo]


def per_example_epsilons(unlearned, retrained, delta: float = DELTA, workers: int | None = None) -> np.ndarray:
    """Epsilon per forget example from confidences U, R [N_models, n_examples] (equal N).

    Positive side = larger median (retrained only if strictly larger, as released); range
    ratio < 0.01 -> 50; otherwise the max over the single- and double-threshold attacks,
    clipped to [0, 50]. Agrees with `epsilon_reference.per_example_epsilons_reference`.

    Sorting, medians and the rules are vectorised over examples (in chunks, to bound memory);
    each example then scores its ~160k thresholds at once, O(log N) each via searchsorted.
    Examples are spread over `workers` threads (default: all CPUs); numpy releases the GIL
    in the heavy calls.
    """
    unlearned, retrained = _check_confidences(unlearned, retrained)
    n_models, n_examples = unlearned.shape
    table = _epsilon_table(n_models, delta)
    epsilons = np.full(n_examples, EPSILON_CAP)
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, n_examples, _CHUNK):
            chunk = slice(start, start + _CHUNK)
            todo, args = _prepare_chunk(unlearned[:, chunk], retrained[:, chunk])
            epsilons[start + todo] = list(pool.map(lambda a: _example_epsilon(*a, table), args))
    return epsilons


# --------------------------------------------------------------------------------------
# Scores


def score_bins(n_models: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges and points: width 0.5 from 0 up to ceil(ln(N - 1)); bin n is worth 2/2^(n+1).

    Follows the released code (14 bins on [0, 7) for N = 512), not the write-up's 13 bins on
    [0, 6.5). With N = 2 there are no bins, so every example scores 0.
    """
    max_epsilon = np.ceil(np.log(n_models - 1)) if n_models > 1 else 0.0
    n_bins = int(max_epsilon / BIN_WIDTH)
    edges = np.arange(n_bins + 1) * BIN_WIDTH
    points = 2.0 / 2.0 ** (np.arange(n_bins) + 1)
    return edges, points


def forget_quality(epsilons, n_models: int) -> dict:
    """F = mean over examples of the points of each epsilon's bin; beyond the last bin: 0.

    Returns forget_quality, per_example_points, bin_edges and bin_points (see `score_bins`;
    the released code's 14-bin variant, not the write-up's 13).
    """
    epsilons = np.asarray(epsilons, dtype=np.float64)
    if epsilons.ndim != 1 or epsilons.size == 0:
        raise ValueError(f"epsilons must be a non-empty 1-D array; got shape {epsilons.shape}")
    if np.isnan(epsilons).any():
        raise ValueError("epsilons contain NaN")
    edges, points = score_bins(n_models)
    bin_index = np.searchsorted(edges[1:], epsilons, side="right")  # first bin whose upper edge > eps
    example_points = np.append(points, 0.0)[bin_index]
    return {
        "forget_quality": float(example_points.mean()),
        "per_example_points": example_points,
        "bin_edges": edges,
        "bin_points": points,
    }


def final_score(F, retain_acc_unlearned, retain_acc_retrained, test_acc_unlearned, test_acc_retrained) -> float:
    """F * (mean retain acc U / mean retain acc R) * (mean test acc U / mean test acc R).

    Accuracies are per model (arrays) or already averaged (scalars); ratios are not capped
    at 1, as in the released code.
    """
    means = [float(np.mean(a)) for a in (retain_acc_unlearned, retain_acc_retrained, test_acc_unlearned, test_acc_retrained)]
    retain_u, retain_r, test_u, test_r = means
    if retain_r <= 0 or test_r <= 0:
        raise ValueError(f"retrained accuracies must be positive to form ratios; got retain {retain_r}, test {test_r}")
    return float(F) * (retain_u / retain_r) * (test_u / test_r)


def _score(unlearned, retrained, accuracies: Mapping, idx_u, idx_r) -> tuple[float, float]:
    """F and Final using unlearned models idx_u and retrained models idx_r."""
    eps = per_example_epsilons(unlearned[idx_u], retrained[idx_r])
    F = forget_quality(eps, len(idx_u))["forget_quality"]
    final = final_score(
        F,
        accuracies["retain_unlearned"][idx_u],
        accuracies["retain_retrained"][idx_r],
        accuracies["test_unlearned"][idx_u],
        accuracies["test_retrained"][idx_r],
    )
    return F, final


def _check_accuracies(accuracies: Mapping, n_models: int) -> dict:
    missing = [k for k in ACCURACY_KEYS if k not in accuracies]
    if missing:
        raise ValueError(f"accuracies is missing keys {missing}; expected {list(ACCURACY_KEYS)}")
    out = {k: np.asarray(accuracies[k], dtype=np.float64).reshape(-1) for k in ACCURACY_KEYS}
    for k, v in out.items():
        if v.shape != (n_models,):
            raise ValueError(f"accuracies[{k!r}] must hold one accuracy per model ({n_models}); got {v.shape[0]}")
        if not np.isfinite(v).all():
            raise ValueError(f"accuracies[{k!r}] contains NaN or inf (is that split empty?)")
    return out


def mean_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Interval for the population mean of values in [0, 1] (per-example points): a Student-t
    interval on the logit scale, mapped back.

    With m the mean, s the sample standard deviation and n values, the delta method gives
    logit(m)'s standard error as s / (sqrt(n) m (1 - m)); the interval is
    expit(logit(m) -+ t_{n-1} * that). It lies in [0, 1] and contains m by construction, and it
    reaches further above m than below when m is small: per-example points are right-skewed
    there (a few examples score far more than most), which is where the plain t interval fell
    short in benchmarks/interval_coverage.py. Measured coverage of a 95% interval (table in
    benchmarks/README.md): 93-95% at 25 and 100 examples for F >= 0.09; for F of 0.02-0.04, 90-92%
    at 25 examples and 93-95% at 100, the truth lying above the interval: a forget set that misses
    the rare high-scoring examples has a low mean and a low spread. Degenerate samples:
    - all values equal (s = 0; m = 0 and m = 1 happen only so): zero width, [m, m]; the
      sample shows no spread to scale an interval by;
    - one value: no spread can be estimated, so the interval is the whole range [0, 1].
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array; got shape {values.shape}")
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ValueError(f"values must lie in [0, 1]; got min {values.min()} and max {values.max()}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1; got {level}")
    mean, n = float(values.mean()), values.size
    if n == 1:
        return 0.0, 1.0
    spread = float(values.std(ddof=1))
    if spread == 0 or mean in (0.0, 1.0):  # m reaches 0 or 1 only when all values are equal (up to rounding)
        return mean, mean
    half_width = stats.t.ppf((1 + level) / 2, n - 1) * spread / np.sqrt(n) / (mean * (1 - mean))
    centre = special.logit(mean)
    # min / max only absorb the rounding of expit(logit(m)), which can land a few ulps off m.
    return min(float(special.expit(centre - half_width)), mean), max(float(special.expit(centre + half_width)), mean)


def scores_with_intervals(epsilons, n_models: int, accuracies: Mapping, level: float = 0.95) -> dict:
    """F and Final, each with an interval over the sampling of forget examples, models fixed.

    F is the mean of per-example points, so its interval is `mean_interval` of those points.
    Final = F x (retain ratio) x (test ratio); the ratios average each model's accuracy over the
    retain and test sets (hundreds to thousands of examples against a forget set of tens) and are
    held fixed, so Final's interval is F's scaled by them. What the interval covers: which forget examples were drawn, given THESE N unlearned and N
    retrained models. It does not cover model-sampling noise, and F itself depends on N (more
    models, more bins and stronger attacks): compare methods at the same N, and see
    `ranking_stability` and benchmarks/interval_coverage.py for the dependence on N.

    epsilons: per-example epsilons from `per_example_epsilons`; accuracies: per-model arrays under
    ACCURACY_KEYS. Returns {forget_quality, final_score: {estimate, low, high}, interval: {...}},
    with low <= estimate <= high, all finite; the estimates are the plain scores.
    """
    accuracies = _check_accuracies(accuracies, n_models)
    points = forget_quality(epsilons, n_models)["per_example_points"]
    F = float(points.mean())
    low, high = mean_interval(points, level)
    # One formula for all three values: scaling by the (non-negative) ratios keeps their order.
    final_low, final, final_high = (final_score(x, *(accuracies[k] for k in ACCURACY_KEYS)) for x in (low, F, high))
    return {
        "forget_quality": {"estimate": F, "low": low, "high": high},
        "final_score": {"estimate": final, "low": final_low, "high": final_high},
        "interval": {
            "method": "logit-scale Student t over per-example points",
            "level": level,
            "covers": "the draw of forget examples, given these models (not model-sampling noise)",
            "n_examples": int(points.size),
            "n_models": int(n_models),
        },
    }


def ranking_stability(per_method_inputs: Mapping, fractions=(1 / 8, 1 / 4, 1 / 2, 1), seed: int = 0) -> pd.DataFrame:
    """Each method's F, Final and rank when only a fraction of the N models is used.

    per_method_inputs: name -> (U, R, accuracies), all methods with the same N. Subsets are
    a seeded random order of model indices, truncated to k = round(fraction * N) (at least 2),
    so the subsets are nested and every method sees the same retrained-model indices.
    Rank 1 is the highest Final. Returns one row per (method, fraction).
    """
    checked = {}
    for name, (u, r, accs) in per_method_inputs.items():
        u, r = _check_confidences(u, r)
        checked[name] = (u, r, _check_accuracies(accs, u.shape[0]))
    sizes = {u.shape[0] for u, _, _ in checked.values()}
    if len(sizes) != 1:
        raise ValueError(f"all methods need the same number of models; got {sorted(sizes)}")
    n_models = sizes.pop()

    rng = np.random.default_rng(seed)
    order_u, order_r = rng.permutation(n_models), rng.permutation(n_models)
    rows = []
    for fraction in fractions:
        k = max(2, int(round(fraction * n_models)))
        for name, (u, r, accs) in checked.items():
            F, final = _score(u, r, accs, order_u[:k], order_r[:k])
            rows.append({"method": name, "fraction": fraction, "n_models": k, "forget_quality": F, "final_score": final})
    table = pd.DataFrame(rows)
    table["rank"] = table.groupby("fraction")["final_score"].rank(ascending=False, method="min").astype(int)
    return table.sort_values(["n_models", "fraction", "rank"], ignore_index=True)


# --------------------------------------------------------------------------------------
# Files


def _load_npy(path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {what} array from {path}: {err}") from err


def score_files(unlearned_path, retrained_path, out_path, labels_path=None, logits: bool = False) -> dict:
    """Score .npy files and write JSON atomically (temp file, then os.replace).

    Inputs are confidences [N_models, n_examples], or with logits=True logits
    [N_models, n_examples, C] plus integer labels [n_examples] from labels_path. Writes and
    returns epsilons (one per example, in order), forget_quality, n_models, n_examples and
    bins (edges and points). Any bad input raises ValueError before anything is written.
    """
    unlearned = _load_npy(unlearned_path, "unlearned")
    retrained = _load_npy(retrained_path, "retrained")
    if logits:
        if labels_path is None:
            raise ValueError("logits=True needs labels_path (integer labels [n_examples])")
        labels = _load_npy(labels_path, "labels")
        for name, arr in (("unlearned", unlearned), ("retrained", retrained)):
            if arr.ndim != 3:
                raise ValueError(f"{name} logits must be 3-D [N_models, n_examples, C]; got ndim={arr.ndim}")
            if not np.isfinite(arr).all():
                raise ValueError(f"{name} logits contain NaN or inf")
        if unlearned.shape != retrained.shape:
            raise ValueError(f"unlearned and retrained logits must have the same shape; got {unlearned.shape} and {retrained.shape}")
        unlearned = logit_scaled_confidence(unlearned, labels)
        retrained = logit_scaled_confidence(retrained, labels)
    elif labels_path is not None:
        raise ValueError("labels_path is only used with logits=True")

    epsilons = per_example_epsilons(unlearned, retrained)
    n_models = unlearned.shape[0]
    quality = forget_quality(epsilons, n_models)
    result = {
        "epsilons": epsilons.tolist(),
        "forget_quality": quality["forget_quality"],
        "n_models": int(n_models),
        "n_examples": int(epsilons.size),
        "bins": {"edges": quality["bin_edges"].tolist(), "points": quality["bin_points"].tolist()},
    }
    write_json(out_path, result, sort_keys=False)
    return result
