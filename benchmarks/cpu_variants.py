"""Ways to take one SGD step of N small nets on the CPU, timed side by side.

The evidence behind the engine's CPU path (benchmarks/README.md): the naive per-model loop,
vmap + functional_call, and the engine's GroupedCNN (the N models as the groups of one grouped
convolution per layer; channels-last for small_cnn, NCHW for small_resnet, whose BatchNorm is
imprecise channels-last; `grouped, other layout` times the layout the engine does not use).
Variants run alternately, round after round, and the median is reported, so that a change in
machine load hits all of them alike.

    PYTHONPATH=. python benchmarks/cpu_variants.py --sizes 1 8 64 256 --threads 1
    PYTHONPATH=. python benchmarks/cpu_variants.py --arch small_resnet --widths 16 32 64 --sizes 8 32 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.func import functional_call, vmap

from unlearnops.nets import build_model
from unlearnops.stack import ModelStack
from unlearnops.training import GroupedCNN

BATCH, CLASSES = 64, 10


def digits_spec(arch: str, width: int, widths: list[int]) -> dict:
    """unlearnops.nets' architecture on digits-shaped input (1x8x8, 10 classes)."""
    options = {"width": width} if arch == "small_cnn" else {"widths": widths}
    return {"arch": arch, "num_classes": CLASSES, "in_channels": 1, "image_size": 8, "options": options}


def make_step(variant: str, n: int, spec: dict):
    stack = ModelStack.fresh(spec, list(range(n)))
    x, y = torch.randn(n, BATCH, 1, 8, 8), torch.randint(0, CLASSES, (n, BATCH))
    if variant == "naive loop":
        modules = [stack.module(i).train() for i in range(n)]
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in modules]

        def step():
            for i, (model, optimizer) in enumerate(zip(modules, optimizers)):
                loss = F.cross_entropy(model(x[i]), y[i])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        return step
    params = {k: v.clone().requires_grad_(True) for k, v in stack.params.items()}
    buffers = {k: v.clone() for k, v in stack.buffers.items()}
    optimizer = torch.optim.SGD(list(params.values()), lr=0.1, momentum=0.9, weight_decay=5e-4)
    base = build_model(spec).train()
    if variant == "vmap":
        batched = vmap(lambda p, b, xb, yb: F.cross_entropy(functional_call(base, (p, b), (xb,)), yb), randomness="different")
        losses = lambda: batched(params, buffers, x, y).sum()  # noqa: E731
    else:  # the engine's CPU path: grouped convolutions
        grouped = GroupedCNN(base)
        if variant == "grouped, other layout":
            grouped.memory_format = torch.channels_last if grouped.memory_format == torch.contiguous_format else torch.contiguous_format
        losses = lambda: F.cross_entropy(grouped(params, x, buffers).flatten(0, 1), y.flatten(), reduction="sum") / BATCH  # noqa: E731

    def step():
        loss = losses()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["small_cnn", "small_resnet"], default="small_cnn")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--width", type=int, default=8, help="small_cnn's width")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64], help="small_resnet's widths")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = digits_spec(args.arch, args.width, args.widths)
    variants = ["naive loop", "vmap", "grouped (engine)", "grouped, other layout"]
    rows = []
    for n in args.sizes:
        steps = {v: make_step(v, n, spec) for v in variants}
        for step in steps.values():
            step()
            step()
        seconds = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v, step in steps.items():
                start = time.perf_counter()
                step()
                seconds[v].append(time.perf_counter() - start)
        naive = statistics.median(seconds["naive loop"])
        for v in variants:
            median = statistics.median(seconds[v])
            rows.append([n, v, f"{median * 1e3:.1f}", f"{median / n * 1e3:.2f}", f"{naive / median:.1f}x"])
    print(f"one SGD step, batch {BATCH} per model, {spec['arch']} {spec['options']} on 8x8 images, torch threads {torch.get_num_threads()}; "
          f"median of {args.rounds} alternating rounds")
    print(tabulate(rows, headers=["N", "variant", "ms / step", "ms / model-step", "vs naive"], tablefmt="github"))


if __name__ == "__main__":
    main()
