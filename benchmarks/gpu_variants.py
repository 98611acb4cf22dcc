"""ResNet-18 (32x32) training-step throughput on CUDA of several ways to train N models.

The exploration behind the engine's GPU path (benchmarks/README.md, "GPU variants"): a plain
per-model loop; one model at batch N*64 (dense convolutions: the ceiling for this net at this
size); vmap over stacked weights with NCHW input, with the models-channels-last input layout,
and compiled. All in bf16 autocast, SGD with momentum, random data. Prints one JSON line per
measurement and writes them all to $OUT/explore.json (or /tmp).

    PYTHONPATH=. python benchmarks/gpu_variants.py
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from benchmarks.bench_training import bf16_matmul_tflops, training_flops
from unlearnops.nets import build_model

SPEC = {"arch": "resnet18", "num_classes": 10, "in_channels": 3, "image_size": 32, "options": {"small_input_stem": True}}
BATCH = 64
PLAN = [("loop", 1), ("loop", 16), ("ideal", 16), ("ideal", 64), ("vmap", 1), ("vmap", 16), ("vmap_cl", 16),
        ("vmap", 64), ("vmap_cl", 64), ("vmap_cl", 128), ("compile_cl", 16)]
results = []


def log(**record) -> None:
    results.append(record)
    print(json.dumps(record), flush=True)
    with open(f"{os.environ.get('OUT', '/tmp')}/explore.json", "w") as f:
        json.dump(results, f, indent=1)


def timeit(step, n_images: int, reps: int = 10, warm: int = 3) -> dict:
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / reps
    return dict(step_ms=seconds * 1e3, img_per_s=n_images / seconds, peak_gb=torch.cuda.max_memory_allocated() / 1e9)


def random_batches(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, BATCH, 3, 32, 32, device="cuda"), torch.randint(0, 10, (n, BATCH), device="cuda")


def loop_variant(n: int):
    """n plain modules, channels-last, one after another; one optimizer step for all."""
    models = [build_model(SPEC, i).cuda().train().to(memory_format=torch.channels_last) for i in range(n)]
    optimizer = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True)
    x, y = random_batches(n)
    x = torch.stack([xi.contiguous(memory_format=torch.channels_last) for xi in x])

    def step():
        optimizer.zero_grad(set_to_none=True)
        for i, model in enumerate(models):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x[i]), y[i])
            loss.backward()
        optimizer.step()

    return step


def vmap_variant(n: int, channels_last: bool = False, compiled: bool = False):
    base = build_model(SPEC).cuda().train()
    modules = [build_model(SPEC, i) for i in range(n)]
    params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in modules]).cuda().requires_grad_(True) for k, _ in modules[0].named_parameters()}
    buffers = {k: torch.stack([dict(m.named_buffers())[k] for m in modules]).cuda() for k, _ in modules[0].named_buffers()}
    optimizer = torch.optim.SGD(list(params.values()), lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True)
    x, y = random_batches(n)
    if channels_last:  # stored [B, H, W, N, C]: the batching rule's [B, N*C, H, W] view is channels-last
        x = x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)
    batched = vmap(lambda p, b, xb, yb: F.cross_entropy(functional_call(base, (p, b), (xb,)), yb), randomness="different")
    if compiled:
        batched = torch.compile(batched)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = batched(params, buffers, x, y)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()

    return step


def ideal_variant(n: int):
    """One model at batch n*64: dense convolutions, the throughput ceiling of this net at this size."""
    model = build_model(SPEC, 0).cuda().train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    x = torch.randn(n * BATCH, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n * BATCH,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    torch.backends.cudnn.benchmark = True
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    log(what="bf16 matmul TFLOP/s", value=bf16_matmul_tflops())
    forward, fwd_bwd = training_flops(SPEC)
    log(what="resnet18 FLOPs per image", forward=forward, fwd_bwd=fwd_bwd)
    variants = {"loop": loop_variant, "ideal": ideal_variant, "vmap": vmap_variant,
                "vmap_cl": lambda n: vmap_variant(n, channels_last=True), "compile_cl": lambda n: vmap_variant(n, True, True)}
    for name, n in PLAN:
        try:
            start = time.perf_counter()
            timing = timeit(variants[name](n), n * BATCH, reps=5 if n >= 64 else 10)
            log(what="step", variant=name, N=n, setup_s=time.perf_counter() - start, **timing)
        except Exception as err:  # e.g. the NCHW bf16 BatchNorm failure: record it and go on
            log(what="step", variant=name, N=n, error=f"{type(err).__name__}: {str(err)[:300]}")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
