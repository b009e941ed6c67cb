"""Issue 11, validation: every tensor argument of the functional API is checked (the message
names the argument, the expected and the got), zero-size dimensions behave as nn.Linear does on
every backend, inf/NaN propagate as in the naive loop on every backend (no emulator check calls
them a kernel bug), every backend returns x's dtype, and autocast leaves fp64 alone."""
import math
import re

import pytest
import torch
from torch import nn

import palora_kernels as pk
from conftest import assert_rel_close
from _layers import assert_unchanged, make_conv, make_linear, snapshot
from palora_kernels import dispatch, palora_conv2d, palora_linear, reference

CPU = torch.device("cpu")


def _runs(backend, op="lora_mm", dtype=torch.float32):
    return dispatch.why_not(backend, CPU, op, dtype) is None


BACKENDS = [b for b in ("torch", "cpp", "triton", "cuda_sim", "reference") if _runs(b)]


def _lin(T=2, r=2, i=5, o=4, bias=True):
    torch.manual_seed(0)
    return (torch.randn(3, i), torch.randn(o, i), torch.randn(o) if bias else None, torch.randn(T, r, i),
            torch.randn(T, o, r), torch.rand(T))


LINEAR_BAD = [  # (argument index, replacement, exception, message)
    (4, torch.randn(2, 6, 2), ValueError, "lora_B: expected shape (2, 4, 2) (T, out, rank) with out = "
                                          "weight.shape[0], got (2, 6, 2)"),
    (4, torch.randn(3, 4, 2), ValueError, "lora_B: expected shape (2, 4, 2)"),
    (4, torch.randn(2, 4, 3), ValueError, "lora_B: expected shape (2, 4, 2)"),
    (3, torch.randn(2, 5), ValueError, "lora_A: expected a 3-D tensor of shape (T, rank, in) with in = "
                                       "weight.shape[1], got shape (2, 5)"),
    (3, torch.randn(2, 2, 6), ValueError, "lora_A: expected shape (2, 2, 5)"),
    (3, torch.randn(0, 2, 5), ValueError, "lora_A: expected at least one task"),
    (2, torch.randn(3), ValueError, "bias: expected shape (4,) (weight.shape[0],), got (3,)"),
    (2, torch.randn(4, 1), ValueError, "bias: expected a 1-D tensor of shape (out,), got shape (4, 1)"),
    (1, torch.randn(4, 5, 1), ValueError, "weight: expected a 2-D tensor of shape (out, in), got shape (4, 5, 1)"),
    (1, torch.randn(4, 6), ValueError, "lora_A: expected shape (2, 2, 6)"),
    (3, torch.randn(2, 2, 5, dtype=torch.float64), TypeError,
     "lora_A: expected dtype torch.float32 (weight's), got torch.float64"),
    (4, torch.randn(2, 4, 2).half(), TypeError, "lora_B: expected dtype torch.float32 (weight's), got torch.float16"),
    (2, torch.ones(4, dtype=torch.long), TypeError, "bias: expected a floating-point tensor, got dtype torch.int64"),
    (3, [[0.0]], TypeError, "lora_A: expected a torch.Tensor of shape (T, rank, in)"),
    (4, torch.randn(2, 4, 2, device="meta"), ValueError, "lora_B: expected device cpu (weight's), got meta"),
    (0, torch.tensor(1.0), ValueError, "x: expected a tensor of shape (..., 5), got a 0-D tensor"),
]


@pytest.mark.parametrize("i, bad, exc, msg", LINEAR_BAD, ids=[m.split(":")[0] + str(k) for k, (_, _, _, m)
                                                               in enumerate(LINEAR_BAD)])
def test_palora_linear_checks_every_tensor(i, bad, exc, msg):
    args = list(_lin())
    args[i] = bad
    with pytest.raises(exc, match=re.escape(msg)):
        palora_linear(*args, 1.0)


CONV_BAD = [
    ("factorized", 3, torch.randn(2, 2, 3, 3, 2), "lora_A: expected shape (2, 2, 3, 3, 3)"),
    ("factorized", 4, torch.randn(2, 5, 2), "lora_B: expected shape (2, 4, 2) (T, C_out, rank), got (2, 5, 2)"),
    ("factorized", 3, torch.randn(2, 2, 9), "lora_A: expected a 5-D tensor of shape (T, rank, C_in, kh, kw)"),
    ("loralib", 3, torch.randn(2, 5, 9), "lora_A: expected shape (T, rank*3, 9) (loralib), got (2, 5, 9)"),
    ("loralib", 4, torch.randn(2, 12, 3), "lora_B: expected shape (2, 12, 6) (T, C_out/groups*k, rank*k) (loralib), got (2, 12, 3)"),
    ("factorized", 1, torch.randn(4, 3, 3), "weight: expected a 4-D tensor of shape (C_out, C_in/groups, kh, kw), got shape (4, 3, 3)"),
    ("factorized", 2, torch.randn(5), "bias: expected shape (4,) (weight.shape[0],), got (5,)"),
]


@pytest.mark.parametrize("param, i, bad, msg", CONV_BAD, ids=[str(k) for k in range(len(CONV_BAD))])
def test_palora_conv2d_checks_every_tensor(param, i, bad, msg):
    layer = make_conv(3, 4, 3, 2, 2, padding=1, parameterization=param)
    args = [torch.randn(2, 3, 5, 5), layer.weight, layer.bias, layer.lora_A, layer.lora_B, torch.rand(2)]
    args[i] = bad
    with pytest.raises(ValueError, match=re.escape(msg)):
        palora_conv2d(*args, 1.0, padding=1, parameterization=param)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, pref_rows", [((2, 0), None), ((2, 0), 2), ((2, 3, 0), 2)],
                         ids=["in0-batch", "in0-sample", "in0-3d-sample"])
def test_zero_in_features_returns_the_bias(backend, shape, pref_rows):
    """PaLoRALinear(0, 3) as nn.Linear(0, 3): the output is the bias, gradients are zeros."""
    layer = make_linear(0, 3, 2, 1)
    plain = nn.Linear(0, 3)
    with torch.no_grad():
        plain.bias.copy_(layer.bias)
    x = torch.randn(shape)
    p = (torch.rand(2) if pref_rows is None else torch.rand(pref_rows, 2)).requires_grad_(True)
    with pk.use_backend(backend):
        y = layer(x, p)
    assert torch.equal(y, plain(x))
    y.sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((3,), float(math.prod(shape[:-1]))))
    assert torch.equal(p.grad, torch.zeros_like(p))
    assert layer.lora_B.grad is not None and torch.equal(layer.lora_B.grad, torch.zeros_like(layer.lora_B))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_per_sample(backend):
    """x (B, 0, in) with a per-sample preference: empty output, zero gradients, on every backend
    (cuda/cuda_sim refused rows_per_sample = 0 before)."""
    layer = make_linear(4, 3, 2, 2)
    x, p = torch.randn(2, 0, 4, requires_grad=True), torch.rand(2, 2, requires_grad=True)
    with pk.use_backend(backend):
        y = layer(x, p)
    assert y.shape == (2, 0, 3)
    y.sum().backward()
    assert torch.equal(p.grad, torch.zeros(2, 2)) and torch.equal(layer.weight.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
def test_inf_nan_in_x_propagate_as_in_the_naive_loop(pref_kind, bad, backend):
    """A non-finite input gives the naive loop's non-finite pattern: same positions, same values
    where they are +-inf, NaN where it is NaN; finite rows stay right. No backend raises."""
    layer = make_linear(6, 5, 2, 2)
    x = torch.randn(4, 6)
    x[1, 2] = bad
    p = torch.rand(2) if pref_kind == "batch" else torch.rand(4, 2)
    with torch.no_grad(), pk.use_backend(backend):
        y = layer(x, p)
    want = reference.palora_linear(x.double(), *(t.double() for t in (layer.weight, layer.bias, layer.lora_A,
                                                                       layer.lora_B, p)), layer.scaling)
    assert torch.equal(torch.isnan(y), torch.isnan(want)), (y, want)
    assert torch.equal(torch.isinf(y), torch.isinf(want))
    fin = torch.isfinite(want)
    assert torch.equal(y[torch.isinf(want)], want[torch.isinf(want)].float())
    assert_rel_close(y[fin], want[fin], torch.float32, "finite entries")
    assert not torch.isfinite(y[1]).any() and torch.isfinite(y[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if _runs(b, dtype=torch.float16)])
def test_every_backend_returns_x_dtype(backend):
    """fp16 layer, fp32 per-sample preference: fp16 out (the reference backend returned fp32)."""
    layer = make_linear(6, 5, 2, 2, dtype=torch.float16)
    x, p = torch.randn(3, 6).half(), torch.rand(3, 2)
    with pk.use_backend(backend):
        assert layer(x, p).dtype == torch.float16
    conv = make_conv(3, 4, 3, 2, 2, padding=1, dtype=torch.float16)
    if _runs(backend, "lora_conv2d", torch.float16):
        with pk.use_backend(backend):
            assert conv(torch.randn(3, 3, 5, 5).half(), p).dtype == torch.float16


@pytest.mark.parametrize("kind", ["linear", "conv-factorized", "conv-loralib"])
def test_autocast_leaves_fp64_alone(kind):
    """nn.Linear / nn.Conv2d under autocast("cpu", bf16) stay fp64 for fp64 tensors; so do ours,
    to fp64 rounding of the oracle."""
    if kind == "linear":
        layer, x, plain = make_linear(6, 5, 2, 2, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64), \
            nn.Linear(6, 5).double()
    else:
        layer = make_conv(3, 4, 3, 2, 2, padding=1, parameterization=kind.split("-")[1], dtype=torch.float64)
        x, plain = torch.randn(2, 3, 5, 5, dtype=torch.float64), nn.Conv2d(3, 4, 3, padding=1).double()
    p = torch.rand(2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, p)
        assert plain(x).dtype == torch.float64
    assert y.dtype == torch.float64
    assert_rel_close(y, layer(x, p), torch.float64, "fp64 under autocast")


def test_failed_call_changes_nothing():
    layer = make_linear(5, 4, 2, 2)
    layer.set_preference(torch.tensor([0.5, 0.5]))
    snap, pref = snapshot(layer), layer._preference
    with torch.no_grad():
        layer.lora_A.data = torch.randn(2, 2, 6)             # a user broke the shapes
    with pytest.raises(ValueError, match=re.escape("lora_A: expected shape (2, 2, 5)")):
        layer(torch.randn(3, 5))
    with torch.no_grad():
        layer.lora_A.data = snap["lora_A"].clone()
    assert_unchanged(layer, snap)
    assert layer._preference is pref and all(t.grad is None for t in layer.parameters())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if _runs(b, "lora_conv2d")])
@pytest.mark.parametrize("kw, msg", [
    (dict(stride=0), "stride: expected values >= 1, got (0, 0)"),
    (dict(stride=(1, 0)), "stride: expected values >= 1, got (1, 0)"),
    (dict(dilation=0), "dilation: expected values >= 1, got (0, 0)"),
    (dict(padding=-1), "padding: expected values >= 0, got (-1, -1)"),
    (dict(dilation=4), "x: expected a padded input at least as large as the dilated kernel 9x9, got 6x6"),
], ids=["stride0", "stride10", "dilation0", "padding-1", "small"])
def test_conv_hyperparameters_checked_on_every_backend(kw, msg, backend):
    """cuda_sim raised ZeroDivisionError on stride 0 (and the torch backend too)."""
    layer = make_conv(3, 4, 3, 2, 2)
    with pytest.raises(ValueError, match=re.escape(msg)):
        palora_conv2d(torch.randn(2, 3, 6, 6), layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                      torch.rand(2), 1.0, backend=backend, **kw)
