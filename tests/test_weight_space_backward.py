"""The per-batch weight-space backward (ops/linear.py, ops/conv2d.py, _math.weight_space_grads):
fp64 gradcheck of every input incl. partial requires_grad, and fp32 gradients vs the fp64 reference.
Shapes are chosen so that use_weight_space() is True (and False for the control case)."""
import pytest
import torch

import palora_kernels as pk
from palora_kernels import reference
from palora_kernels._math import use_weight_space

from conftest import assert_rel_close

F64 = torch.float64


def _linear_inputs(N, i, o, T, r, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, k=1.0: (torch.randn(*s, generator=g) * k).to(dtype)  # noqa: E731
    return [mk(N, i), mk(o, i, k=i ** -0.5), mk(o), mk(T, r, i, k=i ** -0.5), mk(T, o, r),
            torch.rand(T, generator=g).to(dtype)]


def _conv_inputs(N, ci, co, T, r, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, k=1.0: (torch.randn(*s, generator=g) * k).to(dtype)  # noqa: E731
    return [mk(N, ci, 6, 5), mk(co, ci, 3, 3, k=(9 * ci) ** -0.5), mk(co), mk(T, r, ci, 3, 3, k=(9 * ci) ** -0.5),
            mk(T, co, r), torch.rand(T, generator=g).to(dtype)]


def test_rule():
    assert use_weight_space(4096, 1024, 1024, torch.float32)
    assert not use_weight_space(4096, 1024, 1024, torch.bfloat16)     # low precision
    assert not use_weight_space(8, 1024, 1024, torch.float32)         # few rows
    assert not use_weight_space(0, 4, 4, torch.float32)               # empty batch


def test_rule_per_sample_conv():
    """Per-image effective weights: rows = one image's Ho*Wo, K <= Ho*Wo, NCHW x, fp32/fp64."""
    from palora_kernels.ops.conv2d import weight_space
    w, p = torch.empty(64, 64, 3, 3), torch.rand(8, 3)
    x = torch.empty(8, 64, 64, 64)
    assert weight_space(x, w, p, 64, 64)
    assert not weight_space(x.to(memory_format=torch.channels_last), w, p, 64, 64)   # would copy x
    assert not weight_space(x[:, :, :8, :8], w, p, 8, 8)       # K = 576 > 64 pixels: N weights > output
    assert not weight_space(x.bfloat16(), w.bfloat16(), p, 64, 64)


@pytest.mark.parametrize("mask", ["111111", "000111", "000001", "100000", "011000"])
def test_linear_gradcheck(mask):
    ts = _linear_inputs(40, 6, 5, 3, 2)
    assert use_weight_space(40, 6, 5, F64)
    for t, m in zip(ts, mask):
        t.requires_grad_(m == "1")
    assert torch.autograd.gradcheck(lambda *a: pk.palora_linear(*a, 0.7, backend="torch"), ts)


@pytest.mark.parametrize("mask", ["111111", "000111", "100000"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_conv_gradcheck(mask, stride, padding, dilation):
    ts = _conv_inputs(2, 3, 4, 2, 2)
    for t, m in zip(ts, mask):
        t.requires_grad_(m == "1")
    f = lambda *a: pk.palora_conv2d(*a, 0.7, stride=stride, padding=padding, dilation=dilation,  # noqa: E731
                                    backend="torch")
    assert torch.autograd.gradcheck(f, ts)


@pytest.mark.parametrize("mask", ["111111", "000111", "100001"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (1, 2, 2)])
def test_conv_per_sample_gradcheck(mask, stride, padding, dilation):
    """Per-sample preference through per-image effective weights (grouped convolution)."""
    from palora_kernels.ops.conv2d import weight_space
    ts = _conv_inputs(3, 2, 3, 2, 2)
    ts[5] = torch.rand(3, 2, dtype=F64)
    assert weight_space(ts[0], ts[1], ts[5], *[(s + 2 * padding - dilation * 2 - 1) // stride + 1 for s in (6, 5)])
    for t, m in zip(ts, mask):
        t.requires_grad_(m == "1")
    f = lambda *a: pk.palora_conv2d(*a, 0.7, stride=stride, padding=padding, dilation=dilation,  # noqa: E731
                                    backend="torch")
    assert torch.autograd.gradcheck(f, ts)


def test_conv_no_bias_gradcheck():
    ts = _conv_inputs(2, 3, 4, 2, 2)
    ts[2] = None
    for t in ts:
        if t is not None:
            t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: pk.palora_conv2d(*a, 0.7, padding=1, backend="torch"), ts)


@pytest.mark.parametrize("op", ["linear", "conv", "conv-per-sample"])
def test_fp32_grads_vs_fp64_reference(op):
    if op == "linear":
        ts = _linear_inputs(1024, 128, 96, 3, 4, dtype=torch.float32)
        f = lambda *a: pk.palora_linear(*a, 0.5, backend="torch")  # noqa: E731
        fr = lambda *a: reference.palora_linear(*a, 0.5)  # noqa: E731
    else:
        ts = _conv_inputs(4, 8, 16, 3, 4, dtype=torch.float32)
        if op == "conv-per-sample":
            ts[5] = torch.rand(4, 3)
        f = lambda *a: pk.palora_conv2d(*a, 0.5, padding=1, backend="torch")  # noqa: E731
        fr = lambda *a: reference.palora_conv2d(*a, 0.5, 1, 1, 1)  # noqa: E731
    a32 = [t.clone().requires_grad_() for t in ts]
    a64 = [t.double().requires_grad_() for t in ts]
    y = f(*a32)
    gy = torch.randn_like(y)
    y.backward(gy)
    fr(*a64).backward(gy.double())
    for name, u, v in zip(["x", "weight", "bias", "lora_A", "lora_B", "preference"], a32, a64):
        assert_rel_close(u.grad, v.grad, torch.float32, f"{op} d{name}")
