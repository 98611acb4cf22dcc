"""U-LiRA: the per-example likelihood-ratio attack on unlearning, with shadow models from the batched engine.

Hayes et al., "Inexact Unlearning Needs More Careful Evaluations to Avoid a False Sense of
Privacy" (arXiv 2403.01218), as implemented in xcadet/deepunlearn pipeline/lira/ (step_1: random
halves of the data, one original trained per half; step_lira_run: each original unlearned with
a forget set drawn from its half). Population-level attacks (unlearnops.metrics.mia) average over
examples and overestimate forgetting; U-LiRA asks, per example, whether a model trained on it and
then unlearned it can be told from one that never saw it. The math is unlearnops.metrics.ulira.

Design, per setting (params `evaluate.ulira`):
- The scored pool E: `examples` examples of the setting's forget set (a seeded choice). Split k
  (of `splits`) draws a random half E_k of E (seeded).
- Shadow target k: trained from scratch, as the setting's target is (train.fit), on retain u E_k.
  All K train in ONE engine call: each model draws its batches from its own rows
  (training.Stream.rows), and trains exactly as it would alone on that subset.
  Deviation from LiRA's random halves of everything: the retain set is shared by every shadow.
  An attacker who knows the retain set is only stronger, and it keeps every shadow a model of
  this setting (same retain set, the method's hyperparameters tuned for it).
- Per method, per split: `runs_per_split` unlearning runs from target k with forget set E_k, in
  one batched call (method.unlearn takes one forget set and one original per call: each method
  here sees exactly what the benchmark gives it, N copies of one original). In = the runs of the
  splits that held the example, out = the runs of the splits that did not: both unlearned the
  same way, they differ only in having seen the example (Hayes et al.'s in/out).
- References: retrain (the setting's first splits x runs_per_split retrained models, assigned to
  the splits in turn; trained on retain only, so in and out are both never-seen: its figures are
  the chance floor for this many models. With few splits the floor is not 0.5: a split left out
  of its own Gaussians pulls their means away from its runs, a small negative bias) and original (the shadow targets themselves, not unlearned: where every method
  starts; a method above it is given away by the unlearning itself, e.g. forget confidences pushed below a never-seen model's).
Runs of a split share one original, so the K splits are the independent draws: figures depend on
K, on runs_per_split and on |E|, and the outputs state all three.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from unlearnops.config import ConfigError, FieldError, build_dataclass
from unlearnops.data import Part
from unlearnops.metrics import ulira as ulira_math
from unlearnops.metrics.epsilon import logit_scaled_confidence
from unlearnops.stack import ModelStack
from unlearnops.training import FitConfig, Runtime, Stream, predict, train_from_scratch


@dataclass
class UliraConfig:
    """params.yaml `evaluate.ulira`."""

    settings: list[str]   # the settings U-LiRA runs on (its DVC stage's foreach)
    splits: int           # K shadow splits, each a random half of the pool
    runs_per_split: int   # unlearning runs of each method from each split's shadow target
    examples: int         # size of the pool scored (from the forget set)
    seed: int             # pool, halves, shadow and unlearning seeds
    fixed_variance: bool  # one variance per side pooled over examples (Carlini et al., for few shadows)

    def __post_init__(self):
        for field, least in (("splits", 2), ("runs_per_split", 1), ("examples", 2)):  # leave-one-split-out; each split holds half
            if getattr(self, field) < least:
                raise FieldError(field, f"must be >= {least}, got {getattr(self, field)}")


def config_from(params: dict) -> UliraConfig:
    return build_dataclass(UliraConfig, params["evaluate"]["ulira"], "evaluate.ulira")


@dataclass
class Splits:
    """The pool (positions in the forget set, [E]) and each split's half of it ([K, E] bool)."""

    pool: np.ndarray
    member: np.ndarray

    @property
    def k(self) -> int:
        return len(self.member)


def choose_splits(n_forget: int, cfg: UliraConfig) -> Splits:
    """The pool: min(examples, n_forget) forget positions; split k's half: |E| // 2 of them."""
    if n_forget < 2:
        raise ConfigError(f"U-LiRA needs a forget set of at least 2 examples, got {n_forget}")
    rng = np.random.default_rng(cfg.seed)
    pool = np.sort(rng.choice(n_forget, min(cfg.examples, n_forget), replace=False))
    member = np.zeros((cfg.splits, len(pool)), dtype=bool)
    for k in range(cfg.splits):
        member[k, rng.permutation(len(pool))[: len(pool) // 2]] = True
    return Splits(pool, member)


def _subset(part: Part, positions: np.ndarray) -> Part:
    index = torch.as_tensor(positions, dtype=torch.long)
    return Part(part.x[index], part.y[index], part.ids[positions])


def train_shadows(spec: dict, retain: Part, forget: Part, splits: Splits, cfg: UliraConfig, fit: FitConfig, runtime: Runtime,
                  augment: bool) -> ModelStack:
    """Shadow target k trained from scratch on retain u E_k (seed cfg.seed + k), all K in one engine call."""
    pool = _subset(forget, splits.pool)
    x, y = torch.cat([retain.x, pool.x]), torch.cat([retain.y, pool.y])
    n_retain = len(retain)
    rows = torch.stack([torch.cat([torch.arange(n_retain), n_retain + torch.as_tensor(np.flatnonzero(m))]) for m in splits.member])
    stream = Stream(x, y, fit.batch_size, augment, rows=rows)
    stack, _ = train_from_scratch(spec, [cfg.seed + k for k in range(splits.k)], stream, fit, runtime, desc="ulira shadows")
    return stack


def unlearn_shadows(unlearn_one, shadows: ModelStack, forget: Part, splits: Splits, cfg: UliraConfig) -> ModelStack:
    """runs_per_split runs from each shadow target: unlearn_one(originals, forget_k) -> unlearned, where
    originals is target k replicated with its runs' seeds (cfg.seed + 10_000 + k * runs + i)."""
    runs = cfg.runs_per_split
    out = []
    for k in range(splits.k):
        originals = ModelStack.replicate(shadows.select([k]), [cfg.seed + 10_000 + k * runs + i for i in range(runs)])
        out.append(unlearn_one(originals, _subset(forget, splits.pool[splits.member[k]])))
    return ModelStack.concat(out)


def confidences(stack: ModelStack, forget: Part, splits: Splits, runtime: Runtime) -> np.ndarray:
    """Logit-scaled confidence of every model on every pool example's label, [R, E]."""
    pool = _subset(forget, splits.pool)
    return logit_scaled_confidence(predict(stack, pool.x, runtime).numpy(), pool.y.numpy())


def runs_of_splits(n_runs: int, splits: Splits, per_split: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(split of each run [R], membership [R, E]): runs in blocks of per_split per split, or
    (per_split None) assigned to the splits in turn (retrain's models: run r -> split r % K)."""
    split = np.repeat(np.arange(splits.k), per_split) if per_split else np.arange(n_runs) % splits.k
    if len(split) != n_runs:
        raise ValueError(f"{n_runs} runs do not fill {splits.k} splits of {per_split}")
    return split, splits.member[split]


def attack(conf: np.ndarray, split: np.ndarray, member: np.ndarray, cfg: UliraConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """The attack on one set of runs: (metrics, arrays: scores [R, E], member [R, E], split [R], per-example AUC [E])."""
    scores = ulira_math.likelihood_ratios(conf, member, split, cfg.fixed_variance)
    example_auc = ulira_math.per_example_auc(scores, member)
    metrics = {**ulira_math.attack_metrics(scores, member), "runs": int(len(split)),
               "mean_example_auc": float(np.nanmean(example_auc)) if np.isfinite(example_auc).any() else None}
    return metrics, {"scores": scores, "member": member, "split": split, "example_auc": example_auc, "confidence": conf}
