"""Folds of the forget set: the one fold assignment Layered Unlearning and the relearning attack share.

Layered Unlearning (arXiv 2505.09500) unlearns the forget set fold by fold; the relearning attack
fine-tunes on some folds and measures what comes back on the others. Both must cut the forget set
the same way, so both call `assign_folds` here and nothing else decides fold membership.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from unlearnops.config import ConfigError
from unlearnops.data import Part


def assign_folds(sample_ids: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of every forget sample, in the order of `sample_ids`.

    The sorted ids are shuffled with `seed` and dealt into k folds whose sizes differ by at most
    one; a sample's fold depends only on the set of ids, k and the seed, not on their order.
    """
    sample_ids = np.asarray(sample_ids)
    if k < 2:
        raise ConfigError(f"the number of folds k must be at least 2, got {k}")
    if k > len(sample_ids):
        raise ConfigError(f"k = {k} folds but the forget set has {len(sample_ids)} samples; allowed: 2..{len(sample_ids)}")
    if len(np.unique(sample_ids)) != len(sample_ids):
        raise ValueError("forget sample ids are not unique")
    shuffled = np.random.default_rng(seed).permutation(np.sort(sample_ids))
    fold_of_id = dict(zip(shuffled.tolist(), (np.arange(len(shuffled)) % k).tolist()))
    return np.array([fold_of_id[i] for i in sample_ids.tolist()], dtype=np.int64)


def part_where(part: Part, mask: np.ndarray) -> Part:
    """The samples of `part` where the boolean mask is true."""
    index = torch.from_numpy(np.flatnonzero(mask))
    return Part(part.x[index], part.y[index], np.asarray(part.ids)[mask])


def concat_parts(first: Part, second: Part) -> Part:
    return Part(torch.cat([first.x, second.x]), torch.cat([first.y, second.y]), np.concatenate([first.ids, second.ids]))


def layered_stages(k: int) -> list[tuple[list[int], list[int]]]:
    """(folds to forget, folds to keep) at each of the k stages of Layered Unlearning:
    stage i forgets folds 0..i and keeps i+1..k-1 alongside the retain set."""
    return [(list(range(i + 1)), list(range(i + 1, k))) for i in range(k)]


def proper_subsets(k: int) -> list[tuple[int, ...]]:
    """Every non-empty proper subset S of the k folds (the relearning attack trains on S and
    measures the rest), smallest first: for k = 2, (0,) and (1,)."""
    return [s for size in range(1, k) for s in itertools.combinations(range(k), size)]
