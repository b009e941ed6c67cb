"""Equivalence of PaLoRALinear / PaLoRAConv2d (backend "torch") with the fp64 reference loop,
outputs and the gradients of every input, property-based over shapes and layouts.

fp32 must be within TOL[fp32] = 1e-5 relative (max-abs error / max-abs of the fp64 result);
fp16/bf16 within TOL[fp16]/TOL[bf16], the reference then runs in fp64 on the same rounded values.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_rel_close
from _layers import fused_with_grads, make_conv, make_linear, reference_with_grads
from palora_kernels import use_backend

# bounded and reproducible: the same examples on every CI run, no example database on disk
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)
GRADS = ("x", "weight", "bias", "lora_A", "lora_B", "preference")


def _identity(t):
    return t


def _rand(shape, seed, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo)


def _pref(kind, B, T, layout, seed):
    """(pref_base, view): (T,) or (B, T); a strided view of a wider tensor when layout != contiguous."""
    shape = (T,) if kind == "batch" else (B, T)
    if layout == "contiguous":
        return _rand(shape, seed, 0.0, 1.0), _identity
    base = _rand(shape[:-1] + (2 * T,), seed, 0.0, 1.0)
    return base, lambda t: t[..., ::2]


def check_case(layer, x_base, view, p_base, p_view, dtype):
    """Fused (backend torch) vs the fp64 reference: output and every gradient."""
    layer = layer.to(dtype)
    x_base, p_base = x_base.to(dtype), p_base.to(dtype)
    with use_backend("torch"):
        y, grads = fused_with_grads(layer, x_base, view, p_base, p_view)
    assert y.dtype == dtype and not y.isnan().any()
    y_ref, grads_ref = reference_with_grads(layer, x_base, view, p_base, p_view)
    assert_rel_close(y, y_ref, dtype, "output")
    for name in GRADS:
        if name == "bias" and layer.bias is None:
            continue
        assert grads[name] is not None, f"no gradient for {name}"
        assert grads[name].dtype == dtype, f"grad {name}: dtype {grads[name].dtype}, expected {dtype}"
        assert_rel_close(grads[name], grads_ref[name], dtype, f"grad {name}")
    return y, y_ref


# ---------------------------------------------------------------------------------- linear
@st.composite
def linear_cases(draw):
    in_f, out_f = draw(st.integers(1, 37)), draw(st.integers(1, 37))
    T, r = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    x_kind = draw(st.sampled_from(["1d", "2d", "3d"]))
    pref_kind = "batch" if x_kind == "1d" else draw(st.sampled_from(["batch", "sample"]))
    layout = draw(st.sampled_from(["contiguous", "sliced"] if x_kind == "1d" else
                                  ["contiguous", "transposed", "sliced"]))
    B, L = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    return dict(in_f=in_f, out_f=out_f, T=T, r=r, bias=draw(st.booleans()),
                alpha=draw(st.sampled_from([1.0, 2.5, 16.0])), x_kind=x_kind, pref_kind=pref_kind,
                layout=layout, B=B, L=L, seed=draw(st.integers(0, 2 ** 16)))


def linear_input(c):
    """(x_base, view) with view(x_base) of shape (in,), (B, in) or (B, L, in) in the chosen layout."""
    shape = {"1d": (c["in_f"],), "2d": (c["B"], c["in_f"]), "3d": (c["B"], c["L"], c["in_f"])}[c["x_kind"]]
    if c["layout"] == "contiguous":
        return _rand(shape, c["seed"]), _identity
    if c["layout"] == "transposed":                   # stride(-1) != 1: all dims reversed
        return _rand(shape[::-1], c["seed"]), lambda t: t.permute(*reversed(range(t.dim())))
    return _rand(shape[:-1] + (2 * c["in_f"],), c["seed"]), lambda t: t[..., ::2]


def _linear_case(c, dtype):
    layer = make_linear(c["in_f"], c["out_f"], c["T"], c["r"], c["bias"], c["alpha"], seed=c["seed"])
    x_base, view = linear_input(c)
    p_base, p_view = _pref(c["pref_kind"], c["B"], c["T"], c["layout"], c["seed"] + 1)
    assert view(x_base).shape[-1] == c["in_f"]
    if c["layout"] == "transposed" and c["in_f"] > 1 and c["B"] > 1:
        assert not view(x_base).is_contiguous()
    return check_case(layer, x_base, view, p_base, p_view, dtype)


@SETTINGS
@given(linear_cases())
def test_linear_fp32_matches_fp64_reference(c):
    y, _ = _linear_case(c, torch.float32)
    lead = {"1d": (), "2d": (c["B"],), "3d": (c["B"], c["L"])}[c["x_kind"]]
    assert y.shape == (*lead, c["out_f"])


# ---------------------------------------------------------------------------------- conv2d
@st.composite
def conv_cases(draw):
    param = draw(st.sampled_from(["factorized", "loralib"]))
    if param == "loralib":
        kh = kw = draw(st.integers(1, 3))               # loralib needs a square kernel
    else:
        kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # smallest input that gives at least one output position, plus a few
    H = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]) + draw(st.integers(0, 5))
    W = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]) + draw(st.integers(0, 5))
    return dict(param=param, k=(kh, kw), stride=stride, padding=padding, dilation=dilation, H=H, W=W,
                N=draw(st.integers(1, 4)), c_in=draw(st.integers(1, 6)), c_out=draw(st.integers(1, 6)),
                T=draw(st.integers(1, 3)), r=draw(st.integers(1, 3)), bias=draw(st.booleans()),
                alpha=draw(st.sampled_from([1.0, 4.0])),
                pref_kind=draw(st.sampled_from(["batch", "sample"])),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"])),
                seed=draw(st.integers(0, 2 ** 16)))


def conv_input(c):
    N, C, H, W = c["N"], c["c_in"], c["H"], c["W"]
    if c["layout"] == "contiguous":
        return _rand((N, C, H, W), c["seed"]), _identity
    if c["layout"] == "channels_last":
        return _rand((N, C, H, W), c["seed"]), lambda t: t.contiguous(memory_format=torch.channels_last)
    if c["layout"] == "transposed":
        return _rand((N, C, W, H), c["seed"]), lambda t: t.transpose(2, 3)
    return _rand((N, C, H, 2 * W), c["seed"]), lambda t: t[..., ::2]


def _conv_case(c, dtype):
    layer = make_conv(c["c_in"], c["c_out"], c["k"], c["T"], c["r"], c["stride"], c["padding"],
                      c["dilation"], c["bias"], c["alpha"], c["param"], seed=c["seed"])
    x_base, view = conv_input(c)
    p_base, p_view = _pref(c["pref_kind"], c["N"], c["T"], c["layout"], c["seed"] + 1)
    return check_case(layer, x_base, view, p_base, p_view, dtype)


@SETTINGS
@given(conv_cases())
def test_conv2d_fp32_matches_fp64_reference(c):
    y, y_ref = _conv_case(c, torch.float32)
    assert y.shape[:2] == (c["N"], c["c_out"])


# ------------------------------------------------------------------------- fp16 / bf16
# Fixed odd shapes; the reference runs in fp64 on the same rounded values.
LOW_LINEAR = [dict(in_f=67, out_f=45, T=3, r=4, bias=True, alpha=2.0, x_kind="3d", pref_kind=k,
                   layout="contiguous", B=5, L=7, seed=3) for k in ("batch", "sample")]
LOW_CONV = [dict(param=p, k=(3, 3), stride=(1, 2), padding=(1, 0), dilation=(1, 1), H=9, W=11, N=3, c_in=5,
                 c_out=7, T=3, r=2, bias=True, alpha=2.0, pref_kind=k, layout="contiguous", seed=4)
            for p in ("factorized", "loralib") for k in ("batch", "sample")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LOW_LINEAR + LOW_CONV,
                         ids=[f"linear-{c['pref_kind']}" for c in LOW_LINEAR] +
                             [f"conv-{c['param']}-{c['pref_kind']}" for c in LOW_CONV])
def test_low_precision_matches_fp64_reference(case, dtype):
    (_conv_case if "param" in case else _linear_case)(case, dtype)
