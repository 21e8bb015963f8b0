"""Fused models are plain PyTorch: they trace with torch.fx, compile, export, and run in onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import reparam


def make_net() -> nn.Module:
    torch.manual_seed(0)
    blocks = [reparam.ECB(3, 8, use_identity=False), nn.LeakyReLU(0.05), reparam.RRRB(8, 8), nn.LeakyReLU(0.05),
              reparam.ECB(8, 8, padding_mode="reflect", dilation=2), reparam.ERB(8, 8), nn.Conv2d(8, 12, 3, padding=1),
              nn.PixelShuffle(2)]
    for extra in ("dbb", "repconv", "acb"):  # a block missing from the registry fails here
        blocks.insert(-2, reparam.get_block(extra)(8, 8))
    return nn.Sequential(*blocks).eval()


@pytest.fixture(scope="module")
def fused_and_reference():
    net = make_net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(1, 3, 17, 19)
    fused = reparam.fuse_all(net)
    with torch.no_grad():
        ref = net(x)
    return fused, x, ref


def test_fused_model_has_only_plain_layers(fused_and_reference) -> None:
    fused, x, ref = fused_and_reference
    assert {type(m) for m in fused.modules()} <= {nn.Sequential, nn.Conv2d, nn.LeakyReLU, nn.PixelShuffle}
    assert ((fused(x) - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_fx_trace(fused_and_reference) -> None:
    fused, x, ref = fused_and_reference
    gm = torch.fx.symbolic_trace(fused)
    assert torch.allclose(gm(x), ref, rtol=1e-4, atol=1e-5)


def test_torch_export(fused_and_reference) -> None:
    fused, x, ref = fused_and_reference
    ep = torch.export.export(fused, (x,))
    assert torch.allclose(ep.module()(x), ref, rtol=1e-4, atol=1e-5)


def test_torch_compile(fused_and_reference) -> None:
    fused, x, ref = fused_and_reference
    compiled = torch.compile(fused, backend="eager")  # graph capture without a C++ toolchain dependency
    with torch.no_grad():
        assert torch.allclose(compiled(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_online_mode_compiles_and_exports() -> None:
    net = reparam.set_mode(nn.Sequential(reparam.ECB(3, 4), nn.ReLU(), reparam.RRRB(4, 4)), "online").eval()
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        ref = net(x)
        assert torch.allclose(torch.compile(net, backend="eager")(x), ref, atol=1e-6)
    ep = torch.export.export(net, (x,))
    assert torch.allclose(ep.module()(x), ref, atol=1e-6)


@pytest.mark.slow
def test_onnx_export_matches_onnxruntime(fused_and_reference, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    fused, x, ref = fused_and_reference
    path = tmp_path / "fused.onnx"
    torch.onnx.export(fused, (x,), str(path), input_names=["lr"], output_names=["sr"],
                      dynamic_shapes=({2: torch.export.Dim("h", min=8, max=64),
                                       3: torch.export.Dim("w", min=8, max=64)},))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-5)
    x2 = torch.rand(1, 3, 23, 12)  # another (odd) size through the dynamic graph
    (out2,) = sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out2, fused(x2).numpy(), rtol=1e-4, atol=1e-5)
