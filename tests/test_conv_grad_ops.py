"""The conv backward's kernel ops, palora::lora_conv2d_dgrad and palora::lora_conv2d_wgrad, as the
autograd Function uses them: a test backend whose dgrad/wgrad kernels are plain torch compositions
is swapped into the records, so the plumbing in ops/conv2d.py (which gradient comes from which op,
the frozen-base skip, the fall-backs) is checked against the fp64 reference on any machine. The
real kernels (cuda_sim, triton) have their own tests against the same contract."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from palora_kernels import _ops, dispatch
from palora_kernels.backends import RECORDS
from palora_kernels._math import row_scale

from _layers import fused_with_grads, make_conv, reference_with_grads

calls = []


def dgrad(dy, weight, down, up, pref, x_hw, stride, padding, dilation, scale):
    calls.append("dgrad")
    N, C_out, Ho, Wo = dy.shape
    R = down.shape[0]
    dg = torch.einsum("cr,nchw->nrhw", up, dy)
    S = row_scale(pref.to(dy.dtype), R // pref.shape[1], scale)[:, :, None, None]
    dz = torch.cat([dy, dg * S], 1)
    x_meta = torch.empty((N, weight.shape[1], *x_hw), dtype=dy.dtype)
    dx = torch.ops.aten.convolution_backward(dz, x_meta, torch.cat([weight, down]), None, stride, padding, dilation,
                                             False, [0, 0], 1, [True, False, False])[0]
    fmt = _ops.conv_memory_format(dy)
    return dx.contiguous(memory_format=fmt), dg.contiguous(memory_format=fmt)


def wgrad(x, dy, dg, pref, kernel_hw, stride, padding, dilation, scale, need_weight):
    calls.append(("wgrad", need_weight))
    C_out, R = dy.shape[1], dg.shape[1]
    S = row_scale(pref.to(dy.dtype), R // pref.shape[1], scale)[:, :, None, None]
    dz = torch.cat([dy, dg * S], 1)
    w_meta = x.new_empty((C_out + R, x.shape[1], *kernel_hw))
    dw = torch.ops.aten.convolution_backward(dz, x, w_meta, None, stride, padding, dilation, False, [0, 0], 1,
                                             [False, True, False])[1]
    cl = dict(memory_format=torch.contiguous_format)                # fresh, dense tensors: no aliasing outputs
    return (dw[:C_out] if need_weight else dw[:0]).clone(**cl), dw[C_out:].clone(**cl)


@pytest.fixture
def grad_ops_backend(monkeypatch):
    here = f"{__name__}:"
    rec = dataclasses.replace(RECORDS["torch"], kernels={**RECORDS["torch"].kernels,
                                                         "lora_conv2d_dgrad": here + "dgrad",
                                                         "lora_conv2d_wgrad": here + "wgrad"})
    monkeypatch.setitem(RECORDS, "torch", rec)
    dispatch.clear_cache()
    calls.clear()
    yield
    dispatch.clear_cache()


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_backward_through_dgrad_and_wgrad_ops(grad_ops_backend, per_sample, frozen, channels_last):
    torch.manual_seed(0)
    # 24 output pixels < 2*K*C_out/(K + C_out) = 26 (K = 72): the kernels run, not the effective weights
    layer = make_conv(8, 16, 3, T=2, r=2, stride=2, padding=1, dtype=torch.float64)
    layer.weight.requires_grad_(not frozen)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    pref = torch.tensor([[0.3, 0.7], [0.9, 0.1]] if per_sample else [0.3, 0.7], dtype=torch.float64)
    view = (lambda t: t.contiguous(memory_format=torch.channels_last)) if channels_last else (lambda t: t)
    y, got = fused_with_grads(layer, x, view, pref, lambda p: p)
    y_ref, want = reference_with_grads(layer, x, view, pref, lambda p: p)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, g in want.items():
        if name == "weight" and frozen:
            assert got.get(name) is None
            continue
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    assert calls == ["dgrad", ("wgrad", not frozen)]


def test_wgrad_contract_is_checked_by_the_fake():
    x = torch.empty(2, 3, 5, 7, device="meta")
    dy, dg = torch.empty(2, 4, 3, 4, device="meta"), torch.empty(2, 2, 3, 4, device="meta")
    pref = torch.empty(1, 2, device="meta")
    dw, da = _ops.lora_conv2d_wgrad(x, dy, dg, pref, [3, 3], [2, 2], [1, 1], [1, 1], 1.0, False, "torch")
    assert dw.shape == (0, 3, 3, 3) and da.shape == (2, 3, 3, 3)
    with pytest.raises(RuntimeError, match=r"dy: expected an output grid of 3x4 for x of 5x7, got 3x5"):
        _ops.lora_conv2d_wgrad(x, torch.empty(2, 4, 3, 5, device="meta"), torch.empty(2, 2, 3, 5, device="meta"),
                               pref, [3, 3], [2, 2], [1, 1], [1, 1], 1.0, True, "torch")
    with pytest.raises(RuntimeError, match=r"dg: expected \(2, R, 3, 4\)"):
        _ops.lora_conv2d_wgrad(x, dy, torch.empty(2, 2, 4, 4, device="meta"), pref, [3, 3], [2, 2], [1, 1],
                               [1, 1], 1.0, True, "torch")
