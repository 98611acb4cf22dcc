"""How fast does the engine train N models, against training them one by one?

Default mode (CPU or whatever `runtime` in params.yaml selects): the default small_resnet and
small_cnn side by side (`--archs`) on the digits train split with params.yaml's train.fit, for
N = 1, 8, 64, 256 models. The naive
baseline is the loop everybody writes first: per model an nn.Module, torch.optim and a shuffled
pass over in-memory tensors (no DataLoader, so the baseline is as fast as a plain loop gets).
Both sides are timed over `--epochs` epochs (at least 8/N), alternately, `--repeats` times
(median); models per second extrapolate that to train.fit's full epoch count. A second table trains 8 models with the
full settings both ways and compares their test accuracy.

--gpu-resnet: ResNet-18 (32x32 stem) on CIFAR-10-sized random data (50,000 x 3x32x32, 256-level
values, augmentation on) on CUDA: time per epoch and per model, images/s and the fraction of the
GPU's bf16 peak, for the naive loop (nn.Module, channels-last, bf16 autocast) and the engine at
N=1 and at large N.

    PYTHONPATH=. python benchmarks/bench_training.py [--quick] [--threads 1] [--archs small_resnet small_resnet:widths=8,16,32 small_cnn]
    PYTHONPATH=. python benchmarks/bench_training.py --gpu-resnet
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unlearnops import data as data_lib  # noqa: E402
from unlearnops.config import build_dataclass  # noqa: E402
from unlearnops.nets import build_model, model_spec  # noqa: E402
from unlearnops.stack import ModelStack  # noqa: E402
from unlearnops.training import FitConfig, Runtime, Stream, _lr_lambda, cross_entropy_on, fit, predict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def naive_train(spec: dict, seeds: list[int], x: torch.Tensor, y: torch.Tensor, cfg: FitConfig, device: str = "cpu", bf16: bool = False) -> list[torch.nn.Module]:
    """The per-model loop: one nn.Module and one optimiser per model, trained one after another."""
    models = []
    steps = math.ceil(len(y) / cfg.batch_size)
    for seed in seeds:
        model = build_model(spec, seed).to(device).train()
        if device == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps * cfg.epochs))
        gen = torch.Generator().manual_seed(seed)
        for _ in range(cfg.epochs):
            for index in torch.randperm(len(y), generator=gen).to(device).split(cfg.batch_size):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    loss = F.cross_entropy(model(x[index]), y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
        models.append(model)
    return models


def engine_train(spec, seeds, x, y, cfg, runtime) -> ModelStack:
    return fit(ModelStack.fresh(spec, seeds), {"train": Stream(x, y, cfg.batch_size)}, cross_entropy_on("train"), cfg, runtime, driver="train", desc="bench")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def digits_setup(params: dict):
    """The pipeline's own digits split (prepare() into a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        params = {**params, "data": {**params["data"], "name": "digits", "deleted": str(Path(tmp) / "deleted.csv")}}
        data_lib.prepare(params, tmp)
        data = data_lib.load_prepared(tmp)
    spec = model_spec(params, data.num_classes, data.in_channels, data.image_size)
    return data, spec


def arch_spec(spec: dict, params: dict, arch: str) -> dict:
    """`spec` for another architecture: "small_cnn", "small_resnet" (params.yaml's options), or
    with options replaced: "small_resnet:widths=8,16,32" (several: "name:key=value:key=value")."""
    name, *overrides = arch.split(":")
    options = dict(params["model"].get(name) or {})
    for override in overrides:
        key, _, value = override.partition("=")
        numbers = [int(v) for v in value.split(",")]
        options[key] = numbers if "," in value or isinstance(options.get(key), list) else numbers[0]
    return {**spec, "arch": name, "options": options}


def arch_label(spec: dict) -> str:
    return f"{spec['arch']} {' '.join(f'{k}={v}' for k, v in spec['options'].items())}"


def cpu_tables(params: dict, args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    data, default_spec = digits_setup(params)
    specs = [arch_spec(default_spec, params, arch) for arch in args.archs]
    train, test = data["train"], data["test"]
    full = build_dataclass(FitConfig, params["train"]["fit"], "train.fit")
    runtime = Runtime.from_params(params)
    sizes = args.sizes or ([1, 8, 64] if args.quick else [1, 8, 64, 256])
    print(f"digits train split: {len(train)} images {tuple(train.x.shape[1:])}, batch {full.batch_size}, {full.epochs} epochs; "
          f"device {runtime.device}, torch threads {torch.get_num_threads()}, models_per_pass {runtime.models_per_pass}; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    ceiling = cpu_matmul_gflops()
    model_gflop = {}
    for spec in specs:
        # Warm-up: first calls pay for kernel selection and lazy initialisation.
        warm_up = FitConfig(**{**full.__dict__, "epochs": 1})
        naive_train(spec, [0], train.x, train.y, warm_up)
        engine_train(spec, [0, 1], train.x, train.y, warm_up, runtime)
        model_gflop[arch_label(spec)] = training_flops(spec)[1] * len(train) * full.epochs / 1e9  # one model, full training
        print(f"{arch_label(spec)}: one model's training {model_gflop[arch_label(spec)]:.1f} GFLOP counted (torch FlopCounterMode); "
              f"at most {ceiling / model_gflop[arch_label(spec)]:.1f} models/s for any implementation at the fp32 2048^3 matmul rate here ({ceiling:.0f} GFLOP/s)")
    rows = []
    for n in sizes:
        seeds = list(range(n))
        # At least 8 model-epochs per measurement, so that small N is not timed in milliseconds.
        short = FitConfig(**{**full.__dict__, "epochs": max(args.epochs, math.ceil(8 / n))})
        for spec in specs:  # architectures side by side at each N
            naive_s, engine_s = [], []
            for _ in range(1 if args.quick else args.repeats):  # alternate, so that load changes hit both
                naive_s.append(timed(lambda: naive_train(spec, seeds, train.x, train.y, short)))
                engine_s.append(timed(lambda: engine_train(spec, seeds, train.x, train.y, short, runtime)))
            scale = full.epochs / short.epochs
            naive_rate, engine_rate = n / (statistics.median(naive_s) * scale), n / (statistics.median(engine_s) * scale)
            gflop = model_gflop[arch_label(spec)]
            rows.append([arch_label(spec), n, f"{naive_rate:.2f}", f"{engine_rate:.2f}", f"{engine_rate / naive_rate:.1f}x",
                         f"{naive_rate * gflop:.0f} / {engine_rate * gflop:.0f}", f"{engine_rate * gflop / ceiling:.0%}", f"{os.getloadavg()[0]:.1f}"])
            print(tabulate([rows[-1]], tablefmt="plain"), flush=True)
    print(f"\nmodels trained per second ({full.epochs} epochs each; timed over max({args.epochs}, 8/N) epochs, "
          f"median of {1 if args.quick else args.repeats})")
    print(tabulate(rows, headers=["architecture", "N", "naive loop", "engine", "speedup", "GFLOP/s naive / engine", "engine / matmul ceiling", "load avg"], tablefmt="github"))
    if args.quick:
        return
    # Same accuracy: 8 models with the full settings, both ways.
    seeds = list(range(8))
    fmt = lambda a: f"{a.mean():.4f} ± {a.std():.4f} (min {a.min():.4f})"  # noqa: E731
    accuracy_rows = []
    for spec in specs:
        naive_models = naive_train(spec, seeds, train.x, train.y, full)
        with torch.no_grad():
            naive_acc = torch.stack([(m.eval()(test.x).argmax(-1) == test.y).float().mean() for m in naive_models])
        engine_stack = engine_train(spec, seeds, train.x, train.y, full, runtime)
        engine_acc = (predict(engine_stack, test.x, runtime).argmax(-1) == test.y).float().mean(1)
        accuracy_rows.append([arch_label(spec), fmt(naive_acc), fmt(engine_acc)])
    print(f"\ntest accuracy of 8 models, {full.epochs} epochs")
    print(tabulate(accuracy_rows, headers=["architecture", "naive loop", "engine"], tablefmt="github"))


# ---------------------------------------------------------------- GPU: ResNet-18


def bf16_matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def training_flops(spec: dict) -> tuple[float, float]:
    """Counted FLOPs per image of `spec`'s input size (a multiply-add counts 2): forward, forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(spec, 0)
    images = torch.randn(2, spec["in_channels"], spec["image_size"], spec["image_size"])  # 2: training BatchNorm needs more than one value
    with FlopCounterMode(display=False) as counter:
        model(images)
    forward = counter.get_total_flops() / 2
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return forward, counter.get_total_flops() / 2


def cpu_matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """fp32 matrix multiply on the CPU with torch's threads: the practical ceiling of any training loop here."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * size**3 / (time.perf_counter() - start) / 1e9


def gpu_resnet(params: dict, args) -> None:
    assert torch.cuda.is_available(), "--gpu-resnet needs CUDA"
    torch.backends.cudnn.benchmark = True
    spec = {"arch": "resnet18", "num_classes": 10, "in_channels": 3, "image_size": 32, "options": {"small_input_stem": True}}
    base = build_dataclass(FitConfig, params["train"]["fit"], "train.fit")
    batch = args.batch_size or base.batch_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50_000, 3, 32, 32), generator=gen, dtype=torch.uint8)
    x = ((images.float() / 255 - 0.5) / 0.25).cuda()  # resident on the GPU, like the engine keeps it
    y = torch.randint(0, 10, (50_000,), generator=gen).cuda()
    steps_per_epoch = math.ceil(len(y) / batch)
    peak_measured = bf16_matmul_tflops()
    fwd, train_flops = training_flops(spec)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16 peak assumed 989 TFLOP/s (H100 SXM dense datasheet), "
          f"8192^3 bf16 matmul measured {peak_measured:.0f} TFLOP/s")
    print(f"ResNet-18 32x32 FLOPs per image, counted (torch FlopCounterMode, 2 per multiply-add): forward {fwd / 1e9:.2f} G, "
          f"training step {train_flops / 1e9:.2f} G  [the brief's 0.56 G is multiply-adds; x3 = 1.68 G]")
    print(f"batch {batch} per model, {steps_per_epoch} steps per 50k-image epoch; each measurement: {args.steps} steps x 3 epochs "
          f"on a {args.steps * batch}-image slice, epoch 1 (compilation, warm-up) dropped", flush=True)
    cfg = FitConfig(**{**base.__dict__, "epochs": 3, "batch_size": batch})
    rows = []

    def report(name: str, n: int, step_s: float, peak_gb: float) -> None:
        images_per_s = n * batch / step_s
        epoch_s = step_s * steps_per_epoch
        rows.append([name, n, f"{epoch_s:.1f}", f"{epoch_s / n:.2f}", f"{images_per_s:,.0f}", f"{images_per_s * train_flops / 1e12:.0f}",
                     f"{images_per_s * train_flops / 989e12:.1%}", f"{peak_gb:.1f}"])
        print(tabulate([rows[-1]], tablefmt="plain"), flush=True)

    # Naive: one model, plain nn.Module, channels-last, bf16 autocast.
    subset = slice(0, args.steps * batch)
    naive_train(spec, [0], x[subset], y[subset], FitConfig(**{**cfg.__dict__, "epochs": 1}), "cuda", bf16=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: (naive_train(spec, [0], x[subset], y[subset], FitConfig(**{**cfg.__dict__, "epochs": 2}), "cuda", bf16=True), torch.cuda.synchronize()))
    report("naive loop", 1, seconds / (2 * args.steps), torch.cuda.max_memory_allocated() / 1e9)

    stream = Stream(x[subset], y[subset], batch, augment=True)
    one = ModelStack.fresh(spec, [0])
    for n in args.models:
        runtime = Runtime("cuda", models_per_pass=n, eval_batch_size=512, bf16=True, compile=not args.no_compile)
        marks = []

        def mark(epoch, index, models):
            torch.cuda.synchronize()
            marks.append(time.perf_counter())

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            fit(ModelStack.replicate(one, list(range(n))), {"train": stream}, cross_entropy_on("train"), cfg, runtime, driver="train", desc="bench", on_epoch_end=mark)
        except torch.cuda.OutOfMemoryError:
            print(f"engine N={n}: out of memory", flush=True)
            continue
        report("engine" + (" (eager)" if args.no_compile else ""), n, (marks[2] - marks[0]) / (2 * args.steps), torch.cuda.max_memory_allocated() / 1e9)

    print(f"\nResNet-18, CIFAR-10-sized random data, batch {batch} per model, bf16 autocast")
    print(tabulate(rows, headers=["", "N", "s / epoch (all N)", "s / epoch / model", "images/s", "TFLOP/s", "of 989 peak", "peak GB"], tablefmt="github"))
    best = max(rows[1:] or rows, key=lambda r: float(r[4].replace(",", "")))
    per_model_epoch = float(best[3])
    print(f"\n512 models x 30 epochs at the best rate ({best[0]}, N={best[1]}): {512 * 30 * per_model_epoch / 3600:.1f} h "
          f"({512 * 30 * 50_000 * train_flops / 1e18:.2f} EFLOP counted)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--quick", action="store_true", help="N = 1, 8, 64, one repeat, no accuracy table")
    parser.add_argument("--archs", nargs="+", default=["small_resnet", "small_cnn"],
                        help="CPU mode: architectures side by side; small_resnet:widths=8,16,32 replaces an option")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="CPU mode: N values (default 1 8 64 256; --quick: 1 8 64)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs timed per measurement (CPU mode)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per N (CPU mode)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: params.yaml runtime.threads, else torch's)")
    parser.add_argument("--gpu-resnet", action="store_true", help="ResNet-18 on CIFAR-10-sized random data on CUDA")
    parser.add_argument("--models", type=int, nargs="+", default=[1, 64, 128, 192], help="engine N values (GPU mode)")
    parser.add_argument("--steps", type=int, default=30, help="steps per timed epoch (GPU mode)")
    parser.add_argument("--batch-size", type=int, default=None, help="per-model batch (GPU mode; default train.fit's)")
    parser.add_argument("--no-compile", action="store_true", help="GPU mode: eager engine")
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    params["runtime"]["threads"] = args.threads or params["runtime"]["threads"]
    (gpu_resnet if args.gpu_resnet else cpu_tables)(params, args)


if __name__ == "__main__":
    main()
