"""ONNX export of a model and its parity check against PyTorch.

Every registered model version carries an ONNX file; before it is logged, onnxruntime and
PyTorch run the same test images and must agree within the tolerances of params.yaml
`ops.onnx` (largest absolute logit difference, top-1 agreement). A model that does not pass
raises `ExportError`: a version is never registered with an ONNX file that computes something
else than its weights.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unlearnops.config import ConfigError, build_dataclass

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class ExportError(RuntimeError):
    """The ONNX model does not reproduce the PyTorch model (or could not be exported)."""


@dataclass
class OnnxConfig:
    """params.yaml `ops.onnx`."""

    opset: int
    max_abs_logit_diff: float
    min_top1_agreement: float
    parity_max_samples: int | None

    def __post_init__(self):
        if self.max_abs_logit_diff < 0 or not 0 <= self.min_top1_agreement <= 1:
            raise ConfigError(f"ops.onnx: max_abs_logit_diff must be >= 0 and min_top1_agreement in [0, 1]; "
                              f"got {self.max_abs_logit_diff} and {self.min_top1_agreement}")
        if self.parity_max_samples is not None and self.parity_max_samples < 1:
            raise ConfigError(f"ops.onnx.parity_max_samples must be >= 1 or null, got {self.parity_max_samples}")

    @classmethod
    def from_params(cls, params: dict) -> "OnnxConfig":
        return build_dataclass(cls, params["ops"]["onnx"], "ops.onnx")


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, opset: int) -> Path:
    """Write `module` (eval mode, CPU) as ONNX with a dynamic batch dimension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.cpu().eval()
    # The TorchScript exporter (dynamo=False): the torch.export-based default needs the
    # onnxscript package, which this project does not install. torch marks it deprecated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(
                module, (example[:1].cpu(),), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        except Exception as err:  # the exporter raises many types; all mean "not exportable"
            raise ExportError(f"ONNX export failed: {type(err).__name__}: {err}") from err
    return path


@torch.no_grad()
def parity(onnx_path: str | Path, module: nn.Module, x: torch.Tensor, batch_size: int = 512) -> dict:
    """Run onnxruntime and PyTorch on `x`; largest |logit difference| and top-1 agreement."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    module = module.cpu().eval()
    worst, agree = 0.0, 0
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size].cpu().float()
        expected = module(batch).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
    return {"max_abs_logit_diff": worst, "top1_agreement": agree / len(x), "n_samples": len(x)}


def export_checked(module: nn.Module, test_x: torch.Tensor, path: str | Path, cfg: OnnxConfig) -> dict:
    """Export to `path` and check parity on the test images; ExportError if it is off."""
    if len(test_x) == 0:
        raise ExportError("no test images to check ONNX parity on")
    if cfg.parity_max_samples is not None:
        test_x = test_x[: cfg.parity_max_samples]
    export_onnx(module, test_x, path, cfg.opset)
    result = parity(path, module, test_x)
    problems = []
    if not result["max_abs_logit_diff"] <= cfg.max_abs_logit_diff:  # also catches NaN
        problems.append(f"max |logit difference| {result['max_abs_logit_diff']:.3g} > "
                        f"ops.onnx.max_abs_logit_diff {cfg.max_abs_logit_diff:g}")
    if result["top1_agreement"] < cfg.min_top1_agreement:
        problems.append(f"top-1 agreement {result['top1_agreement']:.4f} < "
                        f"ops.onnx.min_top1_agreement {cfg.min_top1_agreement:g}")
    if problems:
        raise ExportError(f"ONNX parity check failed on {result['n_samples']} test images ({path}): "
                          + "; ".join(problems))
    return result
