"""Bad input: a ValueError/TypeError whose message names the argument with the expected and
the actual value, and no parameter, buffer, gradient or layer state changes."""
import math
import re

import pytest
import torch
from torch import nn

import palora_kernels as pk
from _layers import assert_unchanged, make_conv, make_linear, snapshot
from palora_kernels import palora_linear, use_backend

T, B = 3, 2
LAYERS = ["linear", "conv-factorized", "conv-loralib"]


def _layer(kind):
    if kind == "linear":
        return make_linear(5, 4, T, 2)
    return make_conv(3, 4, 3, T, 2, padding=1, parameterization=kind.split("-")[1])


def _x(kind, **kw):
    return torch.randn(B, 5, **kw) if kind == "linear" else torch.randn(B, 3, 6, 6, **kw)


def _expect(layer, exc, match, *args, **kwargs):
    """layer(*args, **kwargs) raises ``exc`` matching ``match``; nothing about the layer changes."""
    snap, pref_before = snapshot(layer), layer._preference
    with pytest.raises(exc, match=match):
        layer(*args, **kwargs)
    assert_unchanged(layer, snap)
    assert all(p.grad is None for p in layer.parameters()), "a failed call left gradients"
    assert layer._preference is pref_before and not layer.merged


# ---------------------------------------------------------------------------- preferences
@pytest.mark.parametrize("kind", LAYERS)
def test_preference_wrong_length(kind):
    layer = _layer(kind)
    _expect(layer, ValueError, re.escape(f"preference: expected shape ({T},) or (batch, {T}), got ({T + 1},)"),
            _x(kind), torch.rand(T + 1))
    _expect(layer, ValueError, re.escape(f"expected shape ({T},) or (batch, {T}), got ({B}, {T - 1})"),
            _x(kind), torch.rand(B, T - 1))
    _expect(layer, ValueError, re.escape(f"got ({B}, 1, {T})"), _x(kind), torch.rand(B, 1, T))


@pytest.mark.parametrize("kind", LAYERS)
def test_preference_wrong_batch(kind):
    layer = _layer(kind)
    _expect(layer, ValueError, rf"preference: .*one row per sample: expected {B} rows .*got {B + 1}",
            _x(kind), torch.rand(B + 1, T))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", LAYERS)
def test_preference_not_finite(kind, bad):
    """Set as the layer's preference: refused (checked once, there). Passed to forward: no check
    (it would be a GPU sync per call); it propagates as in the naive loop."""
    layer = _layer(kind)
    for p in (torch.tensor([0.5, bad, 0.5]), torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.1, bad]])):
        before = layer._preference
        with pytest.raises(ValueError, match=rf"preference: expected finite values, got .*{re.escape(str(bad))}"):
            layer.set_preference(p)
        assert layer._preference is before
        x = _x(kind)
        y = layer(x, p)
        with torch.no_grad(), pk.use_backend("reference"):
            expected = layer(x, p)
        # non-finite exactly where the loop's output is (inf may become NaN: the fused expand sums
        # inf * B over the rank, the loop scales each finished update)
        assert torch.equal(y.isfinite(), expected.isfinite()) and not y.isfinite().all()


@pytest.mark.parametrize("kind", LAYERS)
def test_preference_wrong_type(kind):
    layer = _layer(kind)
    _expect(layer, TypeError, r"preference: expected a torch.Tensor .*got list", _x(kind), [0.3, 0.3, 0.4])
    _expect(layer, TypeError, r"preference: expected a floating-point tensor, got dtype torch.int64",
            _x(kind), torch.tensor([1, 0, 0]))


@pytest.mark.parametrize("kind", LAYERS)
def test_no_preference(kind):
    layer = _layer(kind)
    _expect(layer, ValueError, r"preference: .*needs a preference of shape \(3,\) or \(batch, 3\).*set_preference",
            _x(kind))


def test_set_preference_bad_value_keeps_previous():
    layer = _layer("linear")
    good = torch.tensor([0.2, 0.3, 0.5])
    layer.set_preference(good)
    with pytest.raises(ValueError, match=r"preference: expected finite values"):
        layer.set_preference(torch.tensor([0.2, math.nan, 0.5]))
    with pytest.raises(ValueError, match=r"preference: expected shape \(3,\) or \(batch, 3\), got \(2,\)"):
        pk.set_preference(nn.Sequential(layer), torch.rand(2))
    assert layer._preference is good


# ---------------------------------------------------------------------------- x: dtype, device, features
@pytest.mark.parametrize("kind", LAYERS)
def test_dtype_mismatch(kind):
    layer = _layer(kind)
    _expect(layer, TypeError, r"x: expected dtype torch.float32 \(the layer's parameters\), got torch.float64",
            _x(kind, dtype=torch.float64), torch.rand(T))
    _expect(layer, TypeError, r"x: expected a floating-point tensor, got dtype torch.int64",
            _x(kind).long(), torch.rand(T))


@pytest.mark.parametrize("kind", LAYERS)
def test_device_mismatch_meta(kind):
    layer = _layer(kind)
    _expect(layer, ValueError, r"x: expected device cpu \(the weight's\), got meta",
            _x(kind, device="meta"), torch.rand(T))
    _expect(layer, ValueError, r"preference: expected device cpu \(the input's\), got meta",
            _x(kind), torch.rand(T, device="meta"))


def test_device_mismatch_functional():
    layer = _layer("linear")
    args = (layer.weight, layer.bias, layer.lora_A, layer.lora_B)
    with pytest.raises(ValueError, match=r"preference: expected device cpu \(the input's\), got meta"):
        palora_linear(_x("linear"), *args, torch.rand(B, T, device="meta"), 1.0)
    with pytest.raises(ValueError, match=r"x: expected device cpu \(the weight's\), got meta"):
        palora_linear(_x("linear", device="meta"), *args, torch.rand(T), 1.0)


@pytest.mark.parametrize("kind", LAYERS)
def test_wrong_features(kind):
    layer = _layer(kind)
    if kind == "linear":
        _expect(layer, ValueError, re.escape("x: expected x.shape[-1] (in_features) = 5, got 6"),
                torch.randn(B, 6), torch.rand(T))
        _expect(layer, ValueError, re.escape("x: expected x.shape[-1] (in_features) = 5, got 4"),
                torch.randn(B, 7, 4), torch.rand(B, T))
    else:
        _expect(layer, ValueError, re.escape("x: expected x.shape[1] (in_channels) = 3, got 4"),
                torch.randn(B, 4, 6, 6), torch.rand(T))
        _expect(layer, ValueError, re.escape("x: expected a 4-D tensor (N, C_in, H, W), got shape (3, 6, 6)"),
                torch.randn(3, 6, 6), torch.rand(T))


def test_per_sample_preference_needs_batch_dim():
    layer = _layer("linear")
    _expect(layer, ValueError, re.escape("x: a per-sample preference needs x of shape (batch, ..., in), got (5,)"),
            torch.randn(5), torch.rand(1, T))


# ---------------------------------------------------------------------------- constructor arguments
@pytest.mark.parametrize("arg", ["rank", "num_tasks"])
@pytest.mark.parametrize("value", [0, -1])
def test_rank_and_num_tasks_below_one(arg, value):
    kw = {"num_tasks": 2, "rank": 2, arg: value}
    with pytest.raises(ValueError, match=rf"{arg}: expected an int >= 1, got {value}"):
        pk.PaLoRALinear(4, 3, **kw)
    for param in ("factorized", "loralib"):
        with pytest.raises(ValueError, match=rf"{arg}: expected an int >= 1, got {value}"):
            pk.PaLoRAConv2d(4, 3, 3, parameterization=param, **kw)
    with pytest.raises(TypeError, match=rf"{arg}: expected an int >= 1, got 1.5"):
        pk.PaLoRALinear(4, 3, **{**kw, arg: 1.5})


@pytest.mark.parametrize("arg", ["rank", "num_tasks"])
def test_convert_with_bad_rank_changes_nothing(arg):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    snap, types = snapshot(model), [type(m) for m in model]
    kw = {"num_tasks": 2, "rank": 2, arg: 0}
    with pytest.raises(ValueError, match=rf"{arg}: expected an int >= 1, got 0"):
        pk.convert(model, **kw)
    assert [type(m) for m in model] == types
    assert_unchanged(model, snap)


def test_conv_constructor_arguments():
    with pytest.raises(ValueError, match=r"in_channels: expected a multiple of groups = 2, got 3"):
        pk.PaLoRAConv2d(3, 4, 3, groups=2, num_tasks=2, rank=1)
    with pytest.raises(ValueError, match=r"out_channels: expected a multiple of groups = 2, got 5"):
        pk.PaLoRAConv2d(4, 5, 3, groups=2, num_tasks=2, rank=1)
    with pytest.raises(ValueError, match=r"groups: expected an int >= 1, got 0"):
        pk.PaLoRAConv2d(4, 4, 3, groups=0, num_tasks=2, rank=1)
    with pytest.raises(ValueError, match=r"parameterization: expected one of .*got 'bogus'"):
        pk.PaLoRAConv2d(4, 4, 3, num_tasks=2, rank=1, parameterization="bogus")
    with pytest.raises(ValueError, match=re.escape("kernel_size: parameterization='loralib' needs a square "
                                                   "kernel, got (3, 1)")):
        pk.PaLoRAConv2d(4, 4, (3, 1), num_tasks=2, rank=1, parameterization="loralib")


# ---------------------------------------------------------------------------- backends
BACKEND_LIST = r"expected one of reference, torch, cpp, triton, cuda, cuda_sim, got 'bogus'"


@pytest.mark.parametrize("kind", LAYERS)
def test_unknown_backend_env(kind, monkeypatch):
    layer = _layer(kind)
    monkeypatch.setenv("PALORA_BACKEND", "bogus")
    _expect(layer, ValueError, rf"PALORA_BACKEND: {BACKEND_LIST}", _x(kind), torch.rand(T))


def test_unknown_backend_context_manager_and_argument():
    with pytest.raises(ValueError, match=rf"use_backend\(name\): {BACKEND_LIST}"):
        with use_backend("bogus"):
            pass
    layer = _layer("linear")
    snap = snapshot(layer)
    with pytest.raises(ValueError, match=rf"backend: {BACKEND_LIST}"):
        palora_linear(_x("linear"), layer.weight, layer.bias, layer.lora_A, layer.lora_B, torch.rand(T), 1.0,
                      backend="bogus")
    with pytest.raises(ValueError, match=rf"backend: {BACKEND_LIST}"):
        pk.palora_conv2d(_x("conv"), torch.randn(4, 3, 3, 3), None, torch.randn(T, 1, 3, 3, 3),
                         torch.randn(T, 4, 1), torch.rand(T), 1.0, backend="bogus")
    assert_unchanged(layer, snap)


@pytest.mark.parametrize("how", ["argument", "context", "env"])
def test_requested_backend_that_cannot_run_says_why(how, monkeypatch):
    layer = _layer("linear")
    snap = snapshot(layer)
    reason = r"backend 'cuda' was requested for op 'lora_mm' on cpu \(float32\) but cannot run it: \S+"
    args = (_x("linear"), layer.weight, layer.bias, layer.lora_A, layer.lora_B, torch.rand(T), 1.0)
    with pytest.raises(RuntimeError, match=reason):
        if how == "argument":
            palora_linear(*args, backend="cuda")
        elif how == "context":
            with use_backend("cuda"):
                layer(args[0], args[-2])
        else:
            monkeypatch.setenv("PALORA_BACKEND", "cuda")
            layer(args[0], args[-2])
    assert_unchanged(layer, snap)
