"""The training engine: N models of one architecture trained as one computation.

Parameters of the N models are stacked ([N, ...]) and a per-model loss is mapped over them
with `torch.func.vmap` + `functional_call`; summing the N losses gives every model its own
gradient in one backward pass. Each model keeps its own seed: its own initialisation, data
order and augmentation. With N=1 this is an ordinary training loop.

Methods express their training as a loss over named batches (`retain`, `forget`, ...), so the
same engine runs finetuning, NegGrad+, random labels, ... for all N models at once.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from unlearnops.config import ConfigError, choose
from unlearnops.nets import build_model, without_head
from unlearnops.stack import ModelStack

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "linear")

# A per-model loss: (forward, batches) -> scalar, where forward(x) gives this model's logits
# and batches maps a stream name to this model's (x, y).
LossFn = Callable[[Callable[[torch.Tensor], torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]
# Called after every epoch with (epoch number from 1, which models of the stack, those models).
EpochHook = Callable[[int, slice, ModelStack], None]


@dataclass
class FitConfig:
    """Optimiser settings; every field comes from params.yaml."""

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    warmup_fraction: float = 0.0

    def __post_init__(self):
        choose(self.optimizer, OPTIMIZERS, "optimizer")
        choose(self.schedule, SCHEDULES, "lr schedule")
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0:
            raise ConfigError(f"bad training settings: epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr}")


@dataclass
class Runtime:
    """Where and how the engine runs (params.yaml `runtime`)."""

    device: str = "cpu"
    models_per_pass: int = 64
    eval_batch_size: int = 512
    bf16: bool = False

    @classmethod
    def from_params(cls, params: dict) -> "Runtime":
        cfg = params["runtime"]
        device = cfg["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        choose(device, ("cpu", "cuda"), "runtime.device")
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("runtime.device is 'cuda' but no CUDA device is available")
        torch.set_num_threads(max(1, int(cfg["threads"]))) if cfg.get("threads") else None
        return cls(device, int(cfg["models_per_pass"]), int(cfg["eval_batch_size"]), bool(cfg["bf16"]) and device == "cuda")


@dataclass
class Stream:
    """A data source the engine draws per-model batches from.

    `y` is [n] (labels shared by all models) or [N, n] (row i: model i's own labels, e.g.
    MUSO's per-run forget labels)."""

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    augment: bool = False

    def __len__(self) -> int:
        return len(self.x)

    def for_models(self, index: slice) -> "Stream":
        """The stream as seen by models[index] (only per-model labels need slicing)."""
        return self if self.y.dim() == 1 else replace(self, y=self.y[index])


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4) and horizontal flip, drawn independently per image: x is [..., C, H, W]."""
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    flat = x.reshape(-1, c, h, w)
    n = flat.shape[0]
    flip = torch.rand(n, generator=gen, device=gen.device) < 0.5
    flat = torch.where(flip[:, None, None, None], flat.flip(-1), flat)
    padded = F.pad(flat, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen, device=gen.device)
    dx = torch.randint(0, 9, (n,), generator=gen, device=gen.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols].reshape(*lead, c, h, w)


class _PerModelSampler:
    """Draws [N, B] index batches; model i shuffles with its own generator (its own data order)."""

    def __init__(self, n_items: int, batch_size: int, seeds: list[int], salt: int, device: str):
        self.n_items, self.batch_size = n_items, min(batch_size, n_items)
        self.gens = [torch.Generator().manual_seed(seed * 7919 + salt) for seed in seeds]
        self.device = device
        self.order = None
        self.cursor = n_items  # forces a shuffle on first use

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_items / self.batch_size)

    def next(self) -> torch.Tensor:
        if self.cursor >= self.n_items:
            self.order = torch.stack([torch.randperm(self.n_items, generator=g) for g in self.gens]).to(self.device)
            self.cursor = 0
        index = self.order[:, self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return index


def _lr_lambda(cfg: FitConfig, total_steps: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def _optimizer(cfg: FitConfig, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(tensors, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(tensors, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(
    stack: ModelStack,
    streams: dict[str, Stream],
    loss_fn: LossFn,
    cfg: FitConfig,
    runtime: Runtime,
    *,
    driver: str,
    desc: str = "train",
    grad_scale: dict[str, torch.Tensor] | None = None,
    on_epoch_end: EpochHook | None = None,
) -> ModelStack:
    """Train every model of `stack` for cfg.epochs passes over the `driver` stream.

    Each step draws one batch per stream per model (other streams cycle). `grad_scale`
    multiplies gradients elementwise (masks for SalUn, 1/10 learning rate for kept weights...).
    Models are trained `runtime.models_per_pass` at a time to bound memory. `on_epoch_end`, if
    given, sees the models after every epoch (e.g. to measure accuracy along the way).
    """
    if cfg.epochs == 0:
        return stack
    chunks = []
    for start in range(0, stack.n, runtime.models_per_pass):
        index = slice(start, start + runtime.models_per_pass)
        chunk_scale = {k: v[index] for k, v in grad_scale.items()} if grad_scale else None
        chunk_streams = {name: s.for_models(index) for name, s in streams.items()}
        hook = (lambda epoch, models, index=index: on_epoch_end(epoch, index, models)) if on_epoch_end else None
        chunks.append(_fit_chunk(stack.select(index), chunk_streams, loss_fn, cfg, runtime, driver, desc, chunk_scale, hook))
    return ModelStack.concat(chunks)


def _fit_chunk(stack, streams, loss_fn, cfg, runtime, driver, desc, grad_scale, on_epoch_end):
    device = runtime.device
    base = build_model(stack.spec).to(device).train()
    params = {k: v.detach().to(device).clone().requires_grad_(True) for k, v in stack.params.items()}
    buffers = {k: v.detach().to(device).clone() for k, v in stack.buffers.items()}
    scale = {k: v.to(device) for k, v in (grad_scale or {}).items()}
    data = {name: (s.x.to(device), s.y.to(device)) for name, s in streams.items()}
    samplers = {
        name: _PerModelSampler(len(s), s.batch_size, stack.seeds, salt, device) for salt, (name, s) in enumerate(streams.items())
    }
    # One generator for augmentation and in-loss randomness, seeded by this chunk's model seeds.
    torch.manual_seed(sum(stack.seeds) * 31 + len(stack.seeds))
    aug_gen = torch.Generator(device=device).manual_seed(stack.seeds[0] * 104729 + len(stack.seeds))

    def per_model_loss(p, b, batches):
        return loss_fn(lambda x: functional_call(base, (p, b), (x,)), batches)

    batched_loss = vmap(per_model_loss, in_dims=(0, 0, 0), randomness="different")
    steps = samplers[driver].steps_per_epoch()
    optimizer = _optimizer(cfg, list(params.values()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps * cfg.epochs))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=runtime.bf16)
    bar = tqdm(range(cfg.epochs), desc=f"{desc} x{stack.n}", leave=False, mininterval=1.0, disable=None)
    for epoch in bar:
        total = 0.0
        for _ in range(steps):
            batches = {}
            for name, (x, y) in data.items():
                index = samplers[name].next()
                xb = x[index]
                if streams[name].augment:
                    xb = augment_batch(xb, aug_gen)
                batches[name] = (xb, y[index] if y.dim() == 1 else torch.gather(y, 1, index))
            with autocast:
                losses = batched_loss(params, buffers, batches)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            for k, s in scale.items():
                params[k].grad.mul_(s)
            optimizer.step()
            scheduler.step()
            total += float(losses.detach().mean())
        bar.set_postfix(loss=f"{total / steps:.4f}")
        if on_epoch_end:
            on_epoch_end(epoch + 1, ModelStack(stack.spec, {k: v.detach() for k, v in params.items()}, buffers, stack.seeds))
    return ModelStack(stack.spec, {k: v.detach().cpu() for k, v in params.items()}, {k: v.cpu() for k, v in buffers.items()}, stack.seeds)


def cross_entropy_on(stream: str) -> LossFn:
    def loss(forward, batches):
        x, y = batches[stream]
        return F.cross_entropy(forward(x), y)

    return loss


@torch.no_grad()
def predict(stack: ModelStack, x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Logits of every model on x: [N, len(x), C], float32 on the CPU."""
    return _batched_forward(build_model(stack.spec), stack, x, runtime)


@torch.no_grad()
def penultimate_features(stack: ModelStack, x: torch.Tensor, runtime: Runtime, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Every model's penultimate features (the input of its last nn.Linear) on x: [N, n, d].

    With `rows` ([N, m] indices into x) model i sees only x[rows[i]] (n = m): per-model
    subsets without materialising N copies of the images."""
    body, head = without_head(build_model(stack.spec))
    in_head = lambda k: k.startswith(head + ".")  # noqa: E731
    body_stack = ModelStack(stack.spec, {k: v for k, v in stack.params.items() if not in_head(k)}, stack.buffers, stack.seeds)
    return _batched_forward(body, body_stack, x, runtime, rows)


def _batched_forward(module: torch.nn.Module, stack: ModelStack, x: torch.Tensor, runtime: Runtime, rows: torch.Tensor | None = None) -> torch.Tensor:
    device = runtime.device
    base = module.to(device).eval()
    x_dim = None if rows is None else 0  # shared x, or one batch of rows per model
    forward = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)), in_dims=(0, 0, x_dim))
    n_rows = len(x) if rows is None else rows.shape[1]
    out = []
    for start in range(0, stack.n, runtime.models_per_pass):
        models = slice(start, start + runtime.models_per_pass)
        chunk = stack.select(models).to(device)
        outputs = []
        for i in range(0, n_rows, runtime.eval_batch_size):
            batch = slice(i, i + runtime.eval_batch_size)
            xb = x[batch] if rows is None else x[rows[models, batch]]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=runtime.bf16):
                outputs.append(forward(chunk.params, chunk.buffers, xb.to(device)).float().cpu())
        out.append(torch.cat(outputs, dim=1))
    return torch.cat(out)


def train_from_scratch(spec: dict, seeds: list[int], stream: Stream, cfg: FitConfig, runtime: Runtime, desc: str) -> tuple[ModelStack, float]:
    """Initialise len(seeds) models (model i from seeds[i]) and train them with cross-entropy.
    Returns the stack and the wall time in seconds."""
    start = time.perf_counter()
    stack = ModelStack.fresh(spec, seeds)
    stack = fit(stack, {"train": stream}, cross_entropy_on("train"), cfg, runtime, driver="train", desc=desc)
    return stack, time.perf_counter() - start
