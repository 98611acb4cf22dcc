"""MUSO's theorem, measured: parameter gap to the retrained model in an over-parameterised
random-features regression (and one-hot classification) problem.

The feature map is the `random_features` architecture's; every model is trained by full-batch
gradient descent on squared loss (the theorem's optimiser). Retrained = GD from w0 on retain;
original = GD from w0 on retain + forget; each method continues GD from the original:
  muso          on [retain; forget] with forget relabelled by `muso_relabel`
  finetune      on retain only
  random_label  on [retain; forget] with random forget targets (N(0,1); one-hot: a wrong class)
Gap = ||w_retrained - w||^2 / (2D).

    PYTHONPATH=. python benchmarks/muso_linear.py [--features 400 --retain 100 --forget 10 --seed 0]
"""
from __future__ import annotations

import argparse

import pandas as pd
import torch
import torch.nn.functional as F

from unlearnops.methods.muso import gradient_descent, muso_relabel, parameter_gap
from unlearnops.nets import RandomFeatures, without_head


def gaps(features: int, n_retain: int, n_forget: int, seed: int, classes: int | None, steps: int, in_dim: int, lengthscale: float) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = n_retain + n_forget
    x = torch.randn(n, in_dim, generator=gen)
    body, _ = without_head(RandomFeatures(in_dim, 1, features, lengthscale, seed))
    z = body(x).double()
    if classes is None:
        y = torch.sin(x[:, 0]).double() + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
        w0 = torch.randn(features, generator=gen, dtype=torch.float64) / features**0.5
        random_targets = torch.randn(n_forget, generator=gen, dtype=torch.float64)
    else:
        labels = torch.randint(0, classes, (n,), generator=gen)
        y = F.one_hot(labels, classes).double()
        w0 = torch.randn(features, classes, generator=gen, dtype=torch.float64) / features**0.5
        wrong = (labels[n_retain:] + torch.randint(1, classes, (n_forget,), generator=gen)) % classes
        random_targets = F.one_hot(wrong, classes).double()
    z_r, z_f, y_r = z[:n_retain], z[n_retain:], y[:n_retain]
    lr = 1 / float(torch.linalg.eigvalsh(z.T @ z / n)[-1])  # stable for every subset used below
    original = gradient_descent(z, y, w0, lr, steps)
    retrained = gradient_descent(z_r, y_r, w0, lr, steps)
    relabelled = torch.cat([y_r, muso_relabel(z_r, y_r, z_f, w0, eps=1e-8)])
    return {
        "original (no unlearning)": parameter_gap(retrained, original),
        "muso": parameter_gap(retrained, gradient_descent(z, relabelled, original, lr, steps)),
        "finetune": parameter_gap(retrained, gradient_descent(z_r, y_r, original, lr, steps)),
        "random_label": parameter_gap(retrained, gradient_descent(z, torch.cat([y_r, random_targets]), original, lr, steps)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=400, help="D, random Fourier features")
    parser.add_argument("--retain", type=int, default=100)
    parser.add_argument("--forget", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=4, help="classes of the one-hot problem")
    parser.add_argument("--steps", type=int, default=2000, help="gradient descent steps of every fit")
    parser.add_argument("--in-dim", type=int, default=10, help="dimension of the Gaussian inputs")
    parser.add_argument("--lengthscale", type=float, default=0.5, help="random-features length scale (units of sqrt(in-dim))")
    args = parser.parse_args()
    torch.set_num_threads(1)  # thousands of tiny matmuls: threads only add overhead
    setting = (args.features, args.retain, args.forget, args.seed)
    columns = {
        "regression": gaps(*setting, None, args.steps, args.in_dim, args.lengthscale),
        f"one-hot ({args.classes} classes)": gaps(*setting, args.classes, args.steps, args.in_dim, args.lengthscale),
    }
    table = pd.DataFrame(columns).map(lambda v: f"{v:.3e}")
    print(f"Parameter gap ||w_retrained - w||^2 / (2D) to the retrained model; D={args.features}, "
          f"{args.retain} retain + {args.forget} forget, seed {args.seed}, {args.steps} GD steps")
    print(table.to_markdown(disable_numparse=True))


if __name__ == "__main__":
    main()
