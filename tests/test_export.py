"""ONNX export and its parity check against PyTorch (CPU)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from unlearnops.ops import export
from unlearnops.config import ConfigError
from unlearnops.ops.export import ExportError, OnnxConfig
from unlearnops.nets import build_model

STRICT = OnnxConfig(opset=17, max_abs_logit_diff=1e-4, min_top1_agreement=1.0, parity_max_samples=None)


def model_and_images(arch: str, channels: int, size: int, n: int, options: dict):
    spec = {"arch": arch, "num_classes": 10, "in_channels": channels, "image_size": size, "options": options}
    model = build_model(spec, seed=0).eval()
    if arch == "resnet18":
        # Fresh batch-norm statistics are 0/1; give them values so the export has to carry them.
        gen = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    images = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(2))
    return model, images


@pytest.mark.parametrize("arch,channels,size,n,options", [
    ("small_cnn", 1, 8, 100, {"width": 8}),
    ("resnet18", 3, 32, 24, {"small_input_stem": True}),
])
def test_export_matches_pytorch_on_any_batch_size(tmp_path, arch, channels, size, n, options):
    model, images = model_and_images(arch, channels, size, n, options)
    result = export.export_checked(model, images, tmp_path / "model.onnx", STRICT)
    assert result["n_samples"] == n
    assert result["max_abs_logit_diff"] <= 1e-4
    assert result["top1_agreement"] == 1.0
    onnx.checker.check_model(str(tmp_path / "model.onnx"))
    # The batch dimension is dynamic: a batch of 7 (exported with 1) runs and matches.
    again = export.parity(tmp_path / "model.onnx", model, images[:7], batch_size=7)
    assert again["max_abs_logit_diff"] <= 1e-4 and again["n_samples"] == 7


def test_parity_detects_an_onnx_file_that_computes_something_else(tmp_path, monkeypatch):
    model, images = model_and_images("small_cnn", 1, 8, 64, {"width": 8})
    real_export = export.export_onnx

    def export_then_tamper(module, example, path, opset):
        real_export(module, example, path, opset)
        graph = onnx.load(str(path))
        init = graph.graph.initializer[-1]  # the classifier's bias
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.5), init.name))
        onnx.save(graph, str(path))
        return path

    monkeypatch.setattr(export, "export_onnx", export_then_tamper)
    with pytest.raises(ExportError, match=r"parity check failed on 64 test images.*max \|logit difference\| 0\.5"):
        export.export_checked(model, images, tmp_path / "model.onnx", STRICT)


def test_top1_tolerance_is_enforced_separately(tmp_path, monkeypatch):
    model, images = model_and_images("small_cnn", 1, 8, 32, {"width": 8})
    monkeypatch.setattr(export, "parity", lambda *a, **k: {"max_abs_logit_diff": 0.0, "top1_agreement": 0.5, "n_samples": 32})
    with pytest.raises(ExportError, match=r"top-1 agreement 0\.5000 < ops\.onnx\.min_top1_agreement 1"):
        export.export_checked(model, images, tmp_path / "model.onnx", STRICT)


def test_parity_max_samples_limits_the_check(tmp_path):
    model, images = model_and_images("small_cnn", 1, 8, 50, {"width": 8})
    cfg = OnnxConfig(opset=17, max_abs_logit_diff=1e-4, min_top1_agreement=1.0, parity_max_samples=20)
    assert export.export_checked(model, images, tmp_path / "m.onnx", cfg)["n_samples"] == 20


def test_bad_onnx_settings_and_empty_test_set_are_errors(tmp_path):
    params = {"ops": {"onnx": {"opset": 17, "max_abs_logit_diff": -1, "min_top1_agreement": 1.0, "parity_max_samples": None}}}
    with pytest.raises(ConfigError, match="max_abs_logit_diff"):
        OnnxConfig.from_params(params)
    params["ops"]["onnx"].update(max_abs_logit_diff=1e-3, typo=1)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['typo'\]"):
        OnnxConfig.from_params(params)
    model, _ = model_and_images("small_cnn", 1, 8, 1, {"width": 8})
    with pytest.raises(ExportError, match="no test images"):
        export.export_checked(model, torch.empty(0, 1, 8, 8), tmp_path / "m.onnx", STRICT)
