"""The training engine: N models of one architecture trained as one computation.

Parameters of the N models are stacked ([N, ...]) and a per-model loss is mapped over them
with `torch.func.vmap` + `functional_call`; summing the N losses gives every model its own
gradient in one backward pass. Each model keeps its own seed: its own initialisation, data
order and augmentation, drawn from generators seeded by the model's seed alone, so a model
trains the same whether it runs alone or with 255 others. With N=1 this is an ordinary
training loop.

How the N forwards run, chosen automatically (benchmarks/README.md has the numbers):
- CPU, nn.Sequential CNNs (Conv2d, BatchNorm2d, ReLU, pooling, Flatten, Linear and torchvision
  BasicBlocks: the default small_resnet, small_cnn): `GroupedCNN` runs the N models as one
  network whose layers have N times the channels, [B, N*C, H, W]: one grouped convolution per
  conv layer, one BatchNorm over the N*C channels (running statistics per model), the residual
  add. vmap's own conv rule does the same grouping, but moves batch dimensions around between
  layers (copies) and has no such BatchNorm; doing it once for the whole net is faster.
- Everything else (torchvision's ResNet-18, any module): vmap + functional_call. On CUDA the
  batch is laid out so vmap's grouped convolutions see channels-last tensors, the step runs in
  bf16 autocast, and `torch.compile` fuses the batched step (BatchNorm running statistics are
  stacked buffers, updated per model).
- A single model (N=1, a production run) skips vmap: the plain module, compiled on CUDA.

Methods express their training as a loss over named batches (`retain`, `forget`, ...), so the
same engine runs finetuning, NegGrad+, random labels, ... for all N models at once. A method
whose epochs are passes over different data with one optimiser (SCRUB's max and min passes,
random labels' forget and retain passes) gives `fit` a `Phase` per kind of step and a plan of
phases per epoch; a method that acts on the live models between steps (SalUn's frozen weights,
MUSO's relabelling) or epochs (conv_perturb's re-perturbation) hooks in with `on_step` /
`on_epoch_end`. With `stop_patience` in the fit config (`Monitor`), each model stops at the end
of the epoch at which its accuracy on the monitored parts has converged (the seed study's rule),
independently of its companions.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
# The calls torch.func.vmap itself uses to wrap and unwrap batched tensors (GroupedCNN needs them).
from torch._C._functorch import _add_batch_dim, _remove_batch_dim, maybe_get_level
from torch.func import functional_call, vmap

from unlearnops import progress
from unlearnops.config import ConfigError, FieldError, choose
from unlearnops.nets import build_model, without_head
from unlearnops.stack import ModelStack

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "linear")

# A per-model loss: (forward, batches) -> scalar, where forward(x) gives this model's logits
# and batches maps a stream name to this model's (x, y).
LossFn = Callable[[Callable[[torch.Tensor], torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]
# Called after every epoch with (epoch number from 1, which models of the stack, those models).
EpochHook = Callable[[int, slice, ModelStack], None]
# Called after every optimiser step with (steps done so far, from 1; which models; those live
# models: their tensors are the ones being trained, so the hook may change them in place).
StepHook = Callable[[int, slice, ModelStack], None]


@dataclass(frozen=True)
class Phase:
    """One kind of step of a fit with several passes: its loss, and the streams its batches come
    from (a step draws a batch from these streams only, so a pass over a stream sees each of
    its samples once, in its own shuffled order, however the passes interleave)."""

    loss: LossFn
    streams: tuple[str, ...]


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
    # The stopping rule (`Monitor`): 0 = train every epoch; k > 0 = a model stops once the
    # accuracy on every monitored part changed by less than stop_tolerance k epochs in a row.
    stop_patience: int = 0
    stop_tolerance: float = 0.0

    def __post_init__(self):
        for field, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, field) not in allowed:
                raise FieldError(field, f"unknown value '{getattr(self, field)}'; allowed: {', '.join(allowed)}")
        for field, least in (("epochs", 0), ("batch_size", 1), ("lr", 0), ("momentum", 0), ("weight_decay", 0), ("stop_patience", 0)):
            if getattr(self, field) < least:
                raise FieldError(field, f"must be >= {least}, got {getattr(self, field)}")
        if not 0 <= self.warmup_fraction <= 1:
            raise FieldError("warmup_fraction", f"must be in [0, 1], got {self.warmup_fraction}")
        if self.stop_patience > 0 and not self.stop_tolerance > 0:
            raise FieldError("stop_tolerance", f"stop_patience={self.stop_patience} needs stop_tolerance > 0, got {self.stop_tolerance}")


@dataclass
class Runtime:
    """Where and how the engine runs (params.yaml `runtime`).

    `models_per_pass` is an int everywhere; with `auto_models_per_pass` fit and predict start
    with all the models of the call in one pass and halve it on CUDA out-of-memory."""

    device: str = "cpu"
    models_per_pass: int = 64
    eval_batch_size: int = 512
    bf16: bool = False
    compile: bool = False
    auto_models_per_pass: bool = False

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
        per_pass = cfg["models_per_pass"]
        auto = per_pass == "auto"
        if not auto and (isinstance(per_pass, bool) or not isinstance(per_pass, int) or per_pass < 1):
            raise ConfigError(f"runtime.models_per_pass must be a positive integer or 'auto', got {per_pass!r}")
        compile_ = choose(cfg["compile"], ("auto", True, False), "runtime.compile")
        return cls(
            device,
            int(params["n_models"]) if auto else per_pass,
            int(cfg["eval_batch_size"]),
            bool(cfg["bf16"]) and device == "cuda",
            compile=device == "cuda" if compile_ == "auto" else compile_,
            auto_models_per_pass=auto,
        )


@dataclass
class Stream:
    """A data source the engine draws per-model batches from.

    `y` is [n] (labels shared by all models) or [N, n] (row i: model i's own labels, e.g.
    MUSO's per-run forget labels). `rows` ([N, m] indices into x, or None: all of x) gives each
    model its own subset of m samples (U-LiRA's shadow models, each trained on its own half of
    the scored examples): model i draws its batches from x[rows[i]] exactly as it would from a
    stream of those m samples alone."""

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    augment: bool = False
    rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.x) if self.rows is None else self.rows.shape[1]

    def for_models(self, index: slice) -> "Stream":
        """The stream as seen by models[index] (only per-model labels and rows need slicing)."""
        return replace(self, y=self.y if self.y.dim() == 1 else self.y[index], rows=None if self.rows is None else self.rows[index])


@dataclass
class Monitor:
    """What the stopping rule watches, and what it found.

    `parts` maps a name to (x, y) (e.g. retain and validation). With cfg.stop_patience > 0, fit
    measures every model's accuracy on each part before training and after every epoch; a model
    whose accuracies all changed by less than cfg.stop_tolerance for stop_patience epochs in a
    row has converged: from then on it is frozen (weights and BatchNorm statistics stay as they
    were at that epoch, whatever its companions do), and fit ends once every model converged.
    After fit, `epochs[i]` is the number of epochs model i trained (cfg.epochs if it never
    converged; cfg.epochs for every model when the rule is off)."""

    parts: dict[str, tuple[torch.Tensor, torch.Tensor]]
    epochs: torch.Tensor | None = None


def crop_and_flip(x: torch.Tensor, flip: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Random-crop (pad 4, offsets dy, dx in 0..8) and horizontal-flip augmentation.

    x is [..., C, H, W]; flip, dy, dx are [...]: one draw per image."""
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    flat, flip, dy, dx = x.reshape(-1, c, h, w), flip.reshape(-1), dy.reshape(-1), dx.reshape(-1)
    flat = torch.where(flip[:, None, None, None], flat.flip(-1), flat)
    padded = F.pad(flat, (4, 4, 4, 4))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(len(flat), device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols].reshape(*lead, c, h, w)


class _PerModelSampler:
    """Draws [N, B] index batches; model i shuffles with its own generator (its own data order),
    and draws its own augmentation (flip, crop offsets) for every position of every epoch."""

    def __init__(self, n_items: int, batch_size: int, seeds: list[int], salt: int, device: str, augment: bool):
        self.n_items, self.batch_size = n_items, min(batch_size, n_items)
        self.gens = [torch.Generator().manual_seed(seed * 7919 + salt) for seed in seeds]
        self.device, self.augment = device, augment
        self.order = self.aug = None
        self.cursor = n_items  # forces a shuffle on first use

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_items / self.batch_size)

    def next(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """(index [N, B], (flip, dy, dx) each [N, B] or None without augmentation)."""
        if self.cursor >= self.n_items:
            orders, augs = [], []
            for g in self.gens:
                orders.append(torch.randperm(self.n_items, generator=g))
                if self.augment:  # flip bit, then two crop offsets in 0..8
                    augs.append(torch.randint(0, 2 * 9 * 9, (self.n_items,), generator=g))
            self.order = torch.stack(orders).to(self.device)
            self.aug = torch.stack(augs).to(self.device) if self.augment else None
            self.cursor = 0
        window = slice(self.cursor, self.cursor + self.batch_size)
        self.cursor += self.batch_size
        if self.aug is None:
            return self.order[:, window], None
        code = self.aug[:, window]
        return self.order[:, window], (code >= 81, code % 81 // 9, code % 9)


def _lr_lambda(cfg: FitConfig, total_steps: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * done))
        if cfg.schedule == "linear":
            return max(0.0, 1 - done)
        return 1.0

    return factor


def _optimizer(cfg: FitConfig, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(tensors, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(tensors, lr=cfg.lr, weight_decay=cfg.weight_decay)


class GroupedCNN:
    """N stacked CNNs run as one network whose convolutions have N times the groups.

    Activations are [B, N*C, H, W] (channels-last) through the conv part and [N, B, F] after
    Flatten; Linear layers are batched matmuls. In this layout the N models' BatchNorm is one
    BatchNorm over N*C channels (each channel's statistics are its own model's), so its
    running statistics are the N models' stacked buffers, updated in place. Only layers that
    act per channel or per model are allowed, so the result is exactly the N separate
    forwards (up to float rounding): an nn.Sequential of Conv2d, BatchNorm2d, ReLU, pooling,
    Flatten, Linear and torchvision BasicBlocks (the default small_resnet, small_cnn).
    Training or evaluation follows the module's own mode (`module.train()` / `.eval()`)."""

    PER_CHANNEL = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity)

    def __init__(self, module: nn.Sequential):
        self.module = module
        # Channels-last is faster (max-pool above all), but the CPU's channels-last BatchNorm
        # sums its statistics and gradients less precisely (~1e-6 relative, 10x NCHW's), and
        # SGD on a BatchNorm net amplifies that: a model trained among others differed from
        # itself trained alone by 0.8% of its weights after one epoch (NCHW: 5e-6).
        # benchmarks/README.md has both layouts' speed.
        has_batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
        self.memory_format = torch.contiguous_format if has_batch_norm else torch.channels_last

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Sequential) and all(cls._supports_layer(layer) for layer in module.children())

    @classmethod
    def _supports_layer(cls, layer: nn.Module) -> bool:
        if type(layer) is nn.Conv2d:
            return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
        if type(layer) is nn.BatchNorm2d:  # momentum None (a cumulative average) is not implemented
            return layer.affine and layer.track_running_stats and layer.momentum is not None
        if isinstance(layer, nn.Flatten):
            return (layer.start_dim, layer.end_dim) == (1, -1)
        if isinstance(layer, (nn.Linear, *cls.PER_CHANNEL)):
            return True
        if _is_basic_block(layer):
            downsample = layer.downsample
            return all(cls._supports_layer(m) for m in (layer.conv1, layer.bn1, layer.conv2, layer.bn2)) and (
                downsample is None
                or (isinstance(downsample, nn.Sequential) and all(type(m) in (nn.Conv2d, nn.BatchNorm2d) and cls._supports_layer(m) for m in downsample))
            )
        return False

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x: [N, B, ...] (model i's batch in row i) -> [N, B, ...] outputs. `buffers` holds the
        stacked BatchNorm statistics (in training mode they are updated in place)."""
        n, batch = x.shape[:2]
        h = x.transpose(0, 1).reshape(batch, -1, *x.shape[3:]).contiguous(memory_format=self.memory_format) if x.dim() == 5 else x
        h = self._sequence(self.module, "", h, n, params, buffers or {})
        return h.reshape(batch, n, -1, *h.shape[2:]).transpose(0, 1) if h.dim() == 4 else h

    def _sequence(self, module: nn.Sequential, prefix: str, h: torch.Tensor, n: int, params, buffers) -> torch.Tensor:
        fresh = False  # h is a new tensor that nothing else holds: ReLU may overwrite it
        for name, layer in module.named_children():
            name = prefix + name
            if isinstance(layer, nn.Conv2d):
                h = self._conv(layer, name, h, n, params)
            elif isinstance(layer, nn.BatchNorm2d):
                h = self._batch_norm(layer, name, h, params, buffers)
            elif isinstance(layer, nn.Flatten):
                if h.dim() == 4:  # [B, N*C, H, W] -> [N, B, C*H*W]
                    h = h.reshape(h.shape[0], n, -1).transpose(0, 1)
            elif isinstance(layer, nn.Linear):
                w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
                h = torch.bmm(h, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            elif isinstance(layer, nn.ReLU):
                # conv, matmul and BatchNorm backward need their inputs, not their outputs
                h = torch.relu_(h) if fresh else torch.relu(h)
            elif isinstance(layer, nn.Sequential):
                h = self._sequence(layer, name + ".", h, n, params, buffers)
            elif _is_basic_block(layer):
                h = self._basic_block(layer, name, h, n, params, buffers)
            else:
                h = layer(h)
            fresh = isinstance(layer, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))
        return h

    @staticmethod
    def _conv(layer: nn.Conv2d, name: str, h: torch.Tensor, n: int, params) -> torch.Tensor:
        w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
        return F.conv2d(h, w.flatten(0, 1), None if b is None else b.flatten(), layer.stride, layer.padding, layer.dilation, n * layer.groups)

    @staticmethod
    def _batch_norm(layer: nn.BatchNorm2d, name: str, h: torch.Tensor, params, buffers) -> torch.Tensor:
        """nn.BatchNorm2d.forward for the N models at once: the [N, C] buffers viewed as N*C
        channels (the engine keeps them contiguous, so the in-place updates reach them)."""
        if layer.training:
            buffers[f"{name}.num_batches_tracked"].add_(1)
        return F.batch_norm(
            h, buffers[f"{name}.running_mean"].view(-1), buffers[f"{name}.running_var"].view(-1),
            params[f"{name}.weight"].flatten(), params[f"{name}.bias"].flatten(), layer.training, layer.momentum, layer.eps,
        )

    def _basic_block(self, block: nn.Module, name: str, h: torch.Tensor, n: int, params, buffers) -> torch.Tensor:
        """torchvision's BasicBlock.forward in the grouped layout."""
        out = torch.relu_(self._batch_norm(block.bn1, f"{name}.bn1", self._conv(block.conv1, f"{name}.conv1", h, n, params), params, buffers))
        out = self._batch_norm(block.bn2, f"{name}.bn2", self._conv(block.conv2, f"{name}.conv2", out, n, params), params, buffers)
        identity = h if block.downsample is None else self._sequence(block.downsample, f"{name}.downsample.", h, n, params, buffers)
        return torch.relu_(out + identity)

    def per_model_forward(self, params, buffers, per_model_params, base, per_model_buffers):
        """A forward for use inside vmap: it takes the vmapped x out of vmap, runs all N models
        grouped on the stacked `params` and `buffers` (autograd flows to them as usual; BatchNorm
        statistics are updated in place) and hands the result back to vmap. Inputs batched by an
        inner transform fall back to functional_call."""
        n = next(iter(params.values())).shape[0]
        level = maybe_get_level(next(iter(per_model_params.values())))

        def forward(x: torch.Tensor) -> torch.Tensor:
            if maybe_get_level(x) > level or x.dim() not in (2, 4):  # not [B, F] or [B, C, H, W]
                return functional_call(base, (per_model_params, per_model_buffers), (x,))
            return _add_batch_dim(self(params, _remove_batch_dim(x, level, n, 0), buffers), 0, level)

        return forward


def _is_basic_block(layer: nn.Module) -> bool:
    """Exactly torchvision's BasicBlock (a subclass may change forward). Imported here, not at
    the top: torchvision takes a second to import and small_cnn never needs it."""
    from torchvision.models.resnet import BasicBlock

    return type(layer) is BasicBlock


def _models_channels_last(x: torch.Tensor) -> torch.Tensor:
    """[N, B, C, H, W] -> the same values stored as [B, H, W, N, C], so that the [B, N*C, H, W]
    view vmap's grouped convolutions take is channels-last (cuDNN's fast layout)."""
    return x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2) if x.dim() == 5 else x


def fit(
    stack: ModelStack,
    streams: dict[str, Stream],
    loss: LossFn | dict[str, Phase],
    cfg: FitConfig,
    runtime: Runtime,
    *,
    driver: str | None = None,
    steps_per_epoch: int | None = None,
    plan: list[list[str]] | None = None,
    schedule_per_epoch: bool = False,
    desc: str = "train",
    grad_scale: dict[str, torch.Tensor] | None = None,
    on_step: StepHook | None = None,
    on_epoch_start: EpochHook | None = None,
    on_epoch_end: EpochHook | None = None,
    monitor: Monitor | None = None,
) -> ModelStack:
    """Train every model of `stack` for cfg.epochs epochs with ONE optimiser.

    Two ways to say what an epoch is:
    - `loss` a loss function and `driver` a stream: an epoch is one pass over the driver stream
      (or `steps_per_epoch` steps: a partial pass, the driver's shuffle continuing from epoch to
      epoch); every step draws one batch from every stream (the others cycle).
    - `loss` a dict of `Phase`s and `plan`: epoch e is the steps plan[e] (phase names; len(plan) ==
      cfg.epochs), each drawing from its phase's streams: passes over different data with one
      optimiser, momentum and lr schedule carrying over (SCRUB, random labels, MUSO).
    The lr schedule spans all the steps (`schedule_per_epoch`: it advances once per epoch, as
    torch schedulers stepped per epoch do). `grad_scale` multiplies gradients elementwise (masks
    for SalUn, 1/10 learning rate for kept weights...). Models are trained
    `runtime.models_per_pass` at a time to bound memory; each such chunk runs the whole plan.
    `on_step` sees the live models after every optimiser step, `on_epoch_start` before every
    epoch (the epoch about to run, from 1) and `on_epoch_end` after every epoch.
    `monitor` carries the parts the stopping rule watches (cfg.stop_patience > 0 needs one: it is
    checked at the end of every epoch) and receives the epochs each model trained.
    """
    if cfg.stop_patience and monitor is None:
        raise ConfigError(f"{desc}: stop_patience={cfg.stop_patience} asks for the stopping rule, but this fit monitors no data; set stop_patience: 0 in its fit section")
    if isinstance(loss, dict):
        if plan is None or driver is not None or steps_per_epoch is not None:
            raise ValueError("fit with phases takes a plan (and no driver or steps_per_epoch)")
        if len(plan) != cfg.epochs:
            raise ValueError(f"{desc}: the plan has {len(plan)} epochs, cfg.epochs is {cfg.epochs}")
        unknown = {name for epoch in plan for name in epoch} - set(loss) or {s for phase in loss.values() for s in phase.streams} - set(streams)
        if unknown:
            raise ValueError(f"{desc}: unknown phases or streams {sorted(unknown)}")
        phases = loss
    else:
        if driver is None or plan is not None:
            raise ValueError("fit with one loss takes a driver stream (and no plan)")
        phases = {"train": Phase(loss, tuple(streams))}
        steps = steps_per_epoch or steps_per_pass(streams[driver])
        plan = [["train"] * steps] * cfg.epochs
    if cfg.epochs == 0:
        if monitor is not None:
            monitor.epochs = torch.zeros(stack.n, dtype=torch.long)
        return stack
    # Built once: their compiled code serves every chunk of models.
    steps = {name: _BatchedStep(stack.spec, phase.loss, runtime) for name, phase in phases.items()}

    def run(index: slice) -> tuple[ModelStack, torch.Tensor]:
        chunk_scale = {k: v[index] for k, v in grad_scale.items()} if grad_scale else None
        hooks = {
            "step": (lambda n, models: on_step(n, index, models)) if on_step else None,
            "start": (lambda epoch, models: on_epoch_start(epoch, index, models)) if on_epoch_start else None,
            "epoch": (lambda epoch, models: on_epoch_end(epoch, index, models)) if on_epoch_end else None,
        }
        chunk_streams = {name: s.for_models(index) for name, s in streams.items()}
        chunk_desc = desc if index.stop - index.start == stack.n else f"{desc} [models {index.start + 1}-{index.stop} of {stack.n}]"
        return _fit_chunk(stack.select(index), chunk_streams, phases, steps, plan, cfg, runtime, chunk_desc, chunk_scale, hooks, monitor,
                          schedule_per_epoch)

    stacks, epochs = zip(*_in_passes(stack.n, runtime, run))
    if monitor is not None:
        monitor.epochs = torch.cat(epochs)
        if cfg.stop_patience:
            log.info("%s: epochs trained per model (stopping rule, at most %d): %s", desc, cfg.epochs, monitor.epochs.tolist())
    return ModelStack.concat(list(stacks))


def _in_passes(n: int, runtime: Runtime, run: Callable[[slice], object]) -> list:
    """run(models) for consecutive slices of the n models, `runtime.models_per_pass` at a time;
    with auto_models_per_pass, all at once first, halving the pass on CUDA out-of-memory."""
    size = n if runtime.auto_models_per_pass else runtime.models_per_pass
    results, start = [], 0
    while start < n:
        index = slice(start, min(n, start + size))
        try:
            results.append(run(index))
        except torch.cuda.OutOfMemoryError:
            if not runtime.auto_models_per_pass or size == 1:
                raise
            size = max(1, (index.stop - index.start) // 2)
            torch.cuda.empty_cache()
            continue
        start = index.stop
    return results


class _BatchedStep:
    """The batched loss of one training step, [N] per-model losses, in the fastest form the
    architecture and device allow (module docstring). A single model skips vmap altogether."""

    def __init__(self, spec: dict, loss_fn: LossFn, runtime: Runtime):
        self.base = build_model(spec).to(runtime.device).train()
        self.grouped = GroupedCNN(self.base) if runtime.device == "cpu" and GroupedCNN.supports(self.base) else None
        # channels-last on CUDA under bf16 (vmapped BatchNorm fails on bf16 NCHW batches); fp32
        # stays NCHW, where vmap cannot query channels-last contiguity inside BatchNorm.
        self.channels_last = runtime.device == "cuda" and runtime.bf16
        # The chunk being trained, stacked (GroupedCNN reads them; vmap hands the loss per-model slices).
        self.stacked_params: dict[str, torch.Tensor] = {}
        self.stacked_buffers: dict[str, torch.Tensor] = {}

        def one_model_loss(p, b, batches):
            return loss_fn(lambda x: functional_call(self.base, (p, b), (x,)), batches)

        def per_model_loss(p, b, batches):
            if self.grouped is not None:
                return loss_fn(self.grouped.per_model_forward(self.stacked_params, self.stacked_buffers, p, self.base, b), batches)
            return one_model_loss(p, b, batches)

        self.eager = {"one": one_model_loss, "many": vmap(per_model_loss, in_dims=(0, 0, 0), randomness="different")}
        # Compiled code is specialised to batch shapes; the odd last batch of an epoch runs eagerly
        # rather than paying for a second compilation. GroupedCNN (CPU) stays eager: inductor's
        # CPU code was 2x slower than it here, after a 70 s compilation.
        compile_many = runtime.compile and self.grouped is None
        self.compiled = {"one": torch.compile(one_model_loss) if runtime.compile else None, "many": torch.compile(self.eager["many"]) if compile_many else None}

    def __call__(self, params, buffers, batches, full_batches: bool) -> torch.Tensor:
        n = next(iter(params.values())).shape[0]
        kind = "one" if n == 1 else "many"
        if kind == "one":  # views of the stacked tensors: gradients and BatchNorm updates reach them
            params, buffers = {k: v[0] for k, v in params.items()}, {k: v[0] for k, v in buffers.items()}
            batches = {name: (x[0], y[0]) for name, (x, y) in batches.items()}
            if self.channels_last:
                batches = {name: (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x, y) for name, (x, y) in batches.items()}
        elif self.channels_last:
            batches = {name: (_models_channels_last(x), y) for name, (x, y) in batches.items()}
        self.stacked_params, self.stacked_buffers = params, buffers
        compiled = self.compiled[kind] if full_batches else None
        losses = (compiled or self.eager[kind])(params, buffers, batches)
        return losses.reshape(n)


def _fit_chunk(stack, streams, phases, batched_steps, plan, cfg, runtime, desc, grad_scale, hooks, monitor, schedule_per_epoch) -> tuple[ModelStack, torch.Tensor]:
    device = runtime.device
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: let cuDNN pick its fastest kernels
    params = {k: v.detach().to(device).clone().requires_grad_(True) for k, v in stack.params.items()}
    buffers = {k: v.detach().to(device).clone() for k, v in stack.buffers.items()}
    scale = {k: v.to(device) for k, v in (grad_scale or {}).items()}
    data = {name: (s.x.to(device), s.y.to(device)) for name, s in streams.items()}
    rows = {name: s.rows.to(device) for name, s in streams.items() if s.rows is not None}
    samplers = {
        name: _PerModelSampler(len(s), s.batch_size, stack.seeds, salt, device, s.augment)
        for salt, (name, s) in enumerate(streams.items())
    }
    # In-loss randomness (vmap randomness="different") draws from the global generator.
    torch.manual_seed(sum(stack.seeds) * 31 + len(stack.seeds))
    optimizer = _optimizer(cfg, list(params.values()))
    total = sum(len(epoch) for epoch in plan)
    if schedule_per_epoch:
        epoch_of = [e for e, epoch in enumerate(plan) for _ in epoch]
        per_epoch = _lr_lambda(cfg, len(plan))
        factor = lambda step: per_epoch(epoch_of[min(step, total - 1)])  # noqa: E731
    else:
        factor = _lr_lambda(cfg, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=runtime.bf16)
    stopping = StoppingRule(cfg, monitor.parts, stack, params, buffers, runtime) if cfg.stop_patience else None
    live = lambda: ModelStack(stack.spec, {k: v.detach() for k, v in params.items()}, buffers, stack.seeds)  # noqa: E731
    done = 0
    bar = progress.bar(plan, desc=f"{desc} x{stack.n}")  # shown in a terminal and under dvc repro
    for epoch, names in enumerate(bar):
        if hooks["start"]:
            hooks["start"](epoch + 1, live())
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for name in names:
            batches, full = {}, True
            for stream in phases[name].streams:
                x, y = data[stream]
                index, aug = samplers[stream].next()
                full &= index.shape[1] == samplers[stream].batch_size
                if stream in rows:  # positions in each model's own rows -> indices into x
                    index = torch.gather(rows[stream], 1, index)
                xb = x[index] if aug is None else crop_and_flip(x[index], *aug)
                batches[stream] = (xb, y[index] if y.dim() == 1 else torch.gather(y, 1, index))
            with autocast:
                losses = batched_steps[name](params, buffers, batches, full)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            for k, s in scale.items():
                params[k].grad.mul_(s)
            optimizer.step()
            scheduler.step()
            loss_sum += losses.detach().mean()
            done += 1
            if hooks["step"]:
                hooks["step"](done, live())
        bar.set_postfix(loss=f"{float(loss_sum) / max(1, len(names)):.4f}")
        all_converged = stopping is not None and stopping.after_epoch(epoch + 1, params, buffers)
        if hooks["epoch"]:
            hooks["epoch"](epoch + 1, live())
        if all_converged:
            break
    epochs = stopping.epochs if stopping else torch.full((stack.n,), cfg.epochs)
    return ModelStack(stack.spec, {k: v.detach().cpu() for k, v in params.items()}, {k: v.cpu() for k, v in buffers.items()}, stack.seeds), epochs


class StoppingRule:
    """The stopping rule (`Monitor`) for one pass of models: measures their accuracy on the
    monitored parts before training and after every epoch, and freezes the converged ones.
    `fit` runs it at the end of every epoch; a method made of several fits per round
    (`Unlearner.rounds`) runs it at the end of every round, on the round's output tensors."""

    def __init__(self, cfg: FitConfig, parts: dict, stack: ModelStack, params: dict, buffers: dict, runtime: Runtime):
        self.cfg, self.parts, self.spec, self.seeds, self.runtime = cfg, parts, stack.spec, stack.seeds, runtime
        self.epochs = torch.full((stack.n,), cfg.epochs)
        self.converged = torch.zeros(stack.n, dtype=torch.bool)
        self.calm = torch.zeros(stack.n, dtype=torch.long)  # consecutive epochs of changes below the tolerance
        self.final = {k: v.detach().clone() for k, v in {**params, **buffers}.items()}  # converged models' state
        self.accuracy = torch.zeros(stack.n, len(parts))  # [N, parts], at the last measurement
        self.accuracy = self._measure(params, buffers)

    def _measure(self, params: dict, buffers: dict) -> torch.Tensor:
        """[N, parts] accuracies of the models still training (converged ones keep their last)."""
        active = (~self.converged).nonzero().flatten().tolist()
        models = ModelStack(self.spec, {k: v.detach() for k, v in params.items()}, buffers, self.seeds).select(active)
        accuracy = self.accuracy.clone()
        for j, (x, y) in enumerate(self.parts.values()):
            accuracy[active, j] = (predict(models, x, self.runtime).argmax(-1) == y.cpu()).float().mean(1)
        return accuracy

    @torch.no_grad()
    def after_epoch(self, epoch: int, params: dict, buffers: dict) -> bool:
        """Undo this epoch for the models converged before it, measure the others, freeze the
        newly converged ones. True once every model has converged."""
        tensors = {**params, **buffers}
        frozen = self.converged.to(next(iter(tensors.values())).device)
        for k, v in tensors.items():
            v[frozen] = self.final[k][frozen]
        accuracy = self._measure(params, buffers)
        calm = ((accuracy - self.accuracy).abs() < self.cfg.stop_tolerance).all(1)
        self.calm, self.accuracy = torch.where(calm, self.calm + 1, 0), accuracy
        newly = ~self.converged & (self.calm >= self.cfg.stop_patience)
        on_device = newly.to(frozen.device)
        for k, v in tensors.items():
            self.final[k][on_device] = v[on_device]
        self.epochs[newly] = epoch
        self.converged |= newly
        return bool(self.converged.all())


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
    """module's output for every model of the stack, on shared x or (rows) per-model rows of x."""
    device = runtime.device
    base = module.to(device).eval()
    n_rows = len(x) if rows is None else rows.shape[1]
    if device == "cpu" and GroupedCNN.supports(base):
        grouped = GroupedCNN(base)

        def forward(p, b, xb):  # xb: shared [B, ...] or per-model [N, B, ...]
            return grouped(p, xb if rows is not None else xb.expand(len(next(iter(p.values()))), *xb.shape), b)
    else:
        forward = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)), in_dims=(0, 0, None if rows is None else 0))

    def run(index: slice) -> torch.Tensor:
        chunk = stack.select(index).to(device)
        outputs = []
        for i in range(0, n_rows, runtime.eval_batch_size):
            batch = slice(i, i + runtime.eval_batch_size)
            xb = (x[batch] if rows is None else x[rows[index, batch]]).to(device)
            if device == "cuda" and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=runtime.bf16):
                outputs.append(forward(chunk.params, chunk.buffers, xb).float().cpu())
        return torch.cat(outputs, dim=1)

    return torch.cat(_in_passes(stack.n, runtime, run))


def steps_per_pass(stream: Stream) -> int:
    """Steps of one pass over `stream` (the last batch may be smaller)."""
    return math.ceil(len(stream) / min(stream.batch_size, len(stream)))


def train_from_scratch(spec: dict, seeds: list[int], stream: Stream, cfg: FitConfig, runtime: Runtime, desc: str) -> tuple[ModelStack, float]:
    """Initialise len(seeds) models (model i from seeds[i]) and train them with cross-entropy.
    Returns the stack and the wall time in seconds."""
    start = time.perf_counter()
    stack = ModelStack.fresh(spec, seeds)
    stack = fit(stack, {"train": stream}, cross_entropy_on("train"), cfg, runtime, driver="train", desc=desc)
    return stack, time.perf_counter() - start
