"""What a training or unlearning stage leaves behind: N models, their logits, their time.

Evaluation reads only these files and never retrains. Layout of one run folder:
  models.pt   the N models, stacked (see stack.py)
  logits.npz  per split (retain, forget, val, test): `<split>` [N, n, C] float32 logits,
              `<split>_labels` [n], `<split>_ids` [n]; `seconds_per_model` [N]; `wall_seconds`
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unlearnops.data import PreparedData
from unlearnops.files import savez
from unlearnops.stack import CheckpointError, ModelStack
from unlearnops.training import Runtime, predict

EVAL_SPLITS = ("retain", "forget", "val", "test")


@dataclass
class RunOutputs:
    logits: dict[str, np.ndarray]  # split -> [N, n, C]
    labels: dict[str, np.ndarray]
    ids: dict[str, np.ndarray]
    seconds_per_model: np.ndarray
    wall_seconds: float

    @property
    def n_models(self) -> int:
        return len(self.seconds_per_model)

    def accuracy(self, split: str) -> np.ndarray:
        """Per-model accuracy on a split: [N]."""
        if len(self.labels[split]) == 0:
            return np.full(self.n_models, np.nan)
        return (self.logits[split].argmax(-1) == self.labels[split][None]).mean(axis=1)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        arrays = {"seconds_per_model": self.seconds_per_model, "wall_seconds": np.float64(self.wall_seconds)}
        for split in self.logits:
            arrays[split] = self.logits[split].astype(np.float32)
            arrays[f"{split}_labels"] = self.labels[split]
            arrays[f"{split}_ids"] = self.ids[split]
        savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "RunOutputs":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"logits file not found: {path} (run the stage that makes it)")
        try:
            with np.load(path, allow_pickle=False) as blob:
                splits = [s for s in EVAL_SPLITS if s in blob]
                return cls(
                    {s: blob[s] for s in splits},
                    {s: blob[f"{s}_labels"] for s in splits},
                    {s: blob[f"{s}_ids"] for s in splits},
                    blob["seconds_per_model"],
                    float(blob["wall_seconds"]),
                )
        except Exception as err:  # numpy raises many types for a corrupt or foreign file
            first = (str(err).splitlines() or [""])[0]
            raise CheckpointError(f"corrupt logits file {path}: {type(err).__name__}: {first}") from None


def eval_parts(data: PreparedData, retain_max_samples: int | None, seed: int) -> dict:
    """The splits logits are kept for; retain may be subsampled (it is large on real data)."""
    parts = {s: data[s] for s in EVAL_SPLITS}
    retain = parts["retain"]
    if retain_max_samples and len(retain) > retain_max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(len(retain), retain_max_samples, replace=False))
        index = torch.from_numpy(keep)
        parts["retain"] = type(retain)(retain.x[index], retain.y[index], retain.ids[keep])
    return parts


def run_outputs(stack: ModelStack, parts: dict, runtime: Runtime, wall_seconds: float) -> RunOutputs:
    """Logits of every model of `stack` on every evaluation split that has samples (a data set's
    target, trained before any forget set is chosen, has none: its retain part is all of train)."""
    parts = {s: p for s, p in parts.items() if len(p)}
    logits = {s: predict(stack, p.x, runtime).numpy() for s, p in parts.items()}
    return RunOutputs(
        logits,
        {s: p.y.numpy() for s, p in parts.items()},
        {s: np.asarray(p.ids) for s, p in parts.items()},
        np.full(stack.n, wall_seconds / stack.n),
        wall_seconds,
    )
