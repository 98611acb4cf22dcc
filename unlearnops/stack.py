"""N models of one architecture stored together: stacked weights, one file.

The competition's metric needs many models per method; keeping them stacked lets the
training engine run them as one computation (torch.func.vmap) and keeps outputs tidy.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unlearnops.files import torch_save
from unlearnops.nets import build_model

FORMAT = "unlearnops.stack/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its architecture."""


@dataclass
class ModelStack:
    spec: dict
    params: dict[str, torch.Tensor]  # each [N, ...]
    buffers: dict[str, torch.Tensor]  # each [N, ...]
    seeds: list[int]

    @property
    def n(self) -> int:
        return len(self.seeds)

    @classmethod
    def from_modules(cls, spec: dict, modules: list[nn.Module], seeds: list[int]) -> "ModelStack":
        params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in modules]) for k, _ in modules[0].named_parameters()}
        buffers = {k: torch.stack([dict(m.named_buffers())[k].detach() for m in modules]) for k, _ in modules[0].named_buffers()}
        return cls(spec, params, buffers, list(seeds))

    @classmethod
    def fresh(cls, spec: dict, seeds: list[int]) -> "ModelStack":
        """N newly initialised models, model i initialised from seeds[i]."""
        return cls.from_modules(spec, [build_model(spec, seed) for seed in seeds], seeds)

    @classmethod
    def replicate(cls, original: "ModelStack", seeds: list[int]) -> "ModelStack":
        """N copies of model 0 of `original` (the starting point of N unlearning runs)."""
        n = len(seeds)
        expand = lambda t: t[:1].expand(n, *t.shape[1:]).clone()  # noqa: E731
        return cls(original.spec, {k: expand(v) for k, v in original.params.items()}, {k: expand(v) for k, v in original.buffers.items()}, list(seeds))

    @classmethod
    def concat(cls, stacks: list["ModelStack"]) -> "ModelStack":
        first = stacks[0]
        return cls(
            first.spec,
            {k: torch.cat([s.params[k] for s in stacks]) for k in first.params},
            {k: torch.cat([s.buffers[k] for s in stacks]) for k in first.buffers},
            [seed for s in stacks for seed in s.seeds],
        )

    def select(self, index: slice | list[int]) -> "ModelStack":
        seeds = self.seeds[index] if isinstance(index, slice) else [self.seeds[i] for i in index]
        return ModelStack(self.spec, {k: v[index] for k, v in self.params.items()}, {k: v[index] for k, v in self.buffers.items()}, seeds)

    def to(self, device: torch.device | str) -> "ModelStack":
        return ModelStack(self.spec, {k: v.to(device) for k, v in self.params.items()}, {k: v.to(device) for k, v in self.buffers.items()}, self.seeds)

    def module(self, i: int = 0) -> nn.Module:
        """Model i as an ordinary nn.Module (CPU, eval mode)."""
        model = build_model(self.spec)
        state = {k: v[i].detach().cpu() for k, v in {**self.params, **self.buffers}.items()}
        model.load_state_dict(state)
        return model.eval()

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash mid-write never leaves a half checkpoint behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "format": FORMAT,
            "spec": self.spec,
            "params": {k: v.detach().cpu().contiguous() for k, v in self.params.items()},
            "buffers": {k: v.detach().cpu().contiguous() for k, v in self.buffers.items()},
            "seeds": list(self.seeds),
        }
        torch_save(path, blob)  # unique temp name, fsync, rename

    @classmethod
    def load(cls, path: str | Path) -> "ModelStack":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            with warnings.catch_warnings():  # a foreign file's warnings would add lines to the one error
                warnings.simplefilter("ignore")
                blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for corrupt files
            raise CheckpointError(f"corrupt checkpoint {path}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}") from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an unlearnops model stack (expected format {FORMAT})")
        stack = cls(blob["spec"], blob["params"], blob["buffers"], list(blob["seeds"]))
        expected = build_model(stack.spec).state_dict()
        got = {**stack.params, **stack.buffers}
        if set(expected) != set(got) or any(got[k].shape[1:] != v.shape for k, v in expected.items()):
            raise CheckpointError(f"{path}: weights do not match architecture {stack.spec['arch']}")
        return stack
