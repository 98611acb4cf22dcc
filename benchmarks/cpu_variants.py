"""Ways to take one SGD step of N small CNNs on the CPU, timed side by side.

The evidence behind the engine's CPU path (benchmarks/README.md): the naive per-model loop,
vmap + functional_call, and the engine's GroupedCNN (the N models as the groups of one grouped
convolution per layer, channels-last). Variants run alternately, round after round, and the median is reported, so
that a change in machine load hits all of them alike.

    PYTHONPATH=. python benchmarks/cpu_variants.py --sizes 1 8 64 256 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from torch.func import functional_call, vmap

from unlearnops.training import GroupedCNN

BATCH, CLASSES = 64, 10


def small_cnn(width: int) -> nn.Sequential:  # unlearnops.nets.small_cnn, digits-shaped
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, CLASSES),
    )


def make_step(variant: str, n: int, width: int):
    modules = [small_cnn(width) for _ in range(n)]
    x, y = torch.randn(n, BATCH, 1, 8, 8), torch.randint(0, CLASSES, (n, BATCH))
    if variant == "naive loop":
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in modules]

        def step():
            for i, (model, optimizer) in enumerate(zip(modules, optimizers)):
                loss = F.cross_entropy(model(x[i]), y[i])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        return step
    params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in modules]).requires_grad_(True) for k, _ in modules[0].named_parameters()}
    optimizer = torch.optim.SGD(list(params.values()), lr=0.1, momentum=0.9, weight_decay=5e-4)
    base = small_cnn(width)
    if variant == "vmap":
        batched = vmap(lambda p, xb, yb: F.cross_entropy(functional_call(base, p, (xb,)), yb))
        losses = lambda: batched(params, x, y).sum()  # noqa: E731
    else:  # the engine's CPU path: grouped convolutions, channels-last
        grouped = GroupedCNN(base)
        losses = lambda: F.cross_entropy(grouped(params, x).flatten(0, 1), y.flatten(), reduction="sum") / BATCH  # noqa: E731

    def step():
        loss = losses()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["naive loop", "vmap", "grouped (engine)"]
    rows = []
    for n in args.sizes:
        steps = {v: make_step(v, n, args.width) for v in variants}
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
    print(f"one SGD step, batch {BATCH} per model, small_cnn width {args.width} on 8x8 images, torch threads {torch.get_num_threads()}; median of {args.rounds} alternating rounds")
    print(tabulate(rows, headers=["N", "variant", "ms / step", "ms / model-step", "vs naive"], tablefmt="github"))


if __name__ == "__main__":
    main()
