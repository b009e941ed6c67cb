"""Second derivatives (create_graph=True) are exact on every backend and every path.

The fast backwards treat the saved H as a constant; with grad mode on in the backward the
Functions differentiate the stacked form in torch ops instead (ops/linear.py). gradgradcheck in
fp64 covers linear and both conv parameterisations, per-batch and per-sample preferences, small
N (the kernel path) and large N (the effective-weight path). A gradient penalty through lora_A
(the case of issue 11, off by 6.4 before) is compared with the fp64 naive loop on fp32 backends.
"""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from conftest import TOL, assert_rel_close
from palora_kernels import palora_conv2d, palora_linear, reference
from palora_kernels._math import use_weight_space
from palora_kernels.ops.conv2d import weight_space

f64 = dict(dtype=torch.float64)
T, R = 2, 2


def _leaf(*shape, lo=-1.0, hi=1.0):
    return (torch.rand(*shape, **f64) * (hi - lo) + lo).requires_grad_(True)


def _backends(op):
    """fp64-capable backends that run op on CPU here (triton under the interpreter)."""
    from palora_kernels import dispatch
    return [b for b in ("torch", "triton", "reference") if dispatch.why_not(b, torch.device("cpu"), op,
                                                                            torch.float64) is None]


# in=5, out=4: the weight-space path starts at N*9 >= 40 rows -> N = 2 (kernel), N = 6 (weights)
@pytest.mark.parametrize("backend", _backends("lora_mm"))
@pytest.mark.parametrize("N", [2, 6], ids=["smallN", "largeN"])
@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
def test_gradgradcheck_linear(pref_kind, N, backend):
    torch.manual_seed(0)
    in_f, out_f = 5, 4
    assert use_weight_space(N, in_f, out_f, torch.float64) == (N == 6)
    x, weight, bias = _leaf(N, in_f), _leaf(out_f, in_f), _leaf(out_f)
    lora_A, lora_B = _leaf(T, R, in_f), _leaf(T, out_f, R)
    pref = _leaf(T, lo=0.1) if pref_kind == "batch" else _leaf(N, T, lo=0.1)

    def fn(*a):
        return palora_linear(*a, 1.5, backend=backend)

    args = (x, weight, bias, lora_A, lora_B, pref)
    assert gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradgradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradgradcheck_linear_3d_per_sample():
    torch.manual_seed(1)
    x = _leaf(2, 3, 4)
    args = (x, _leaf(3, 4), None, _leaf(T, R, 4), _leaf(T, 3, R), _leaf(2, T, lo=0.1))
    fn = lambda x, w, b, A, B, p: palora_linear(x, w, b, A, B, p, 0.5, backend="torch")  # noqa: E731
    assert gradgradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


# c_in=2, k=2 (K=8), c_out=2: per-sample weights need Ho*Wo >= 8 -> 4x4 input (3x3 out) takes them,
# 2x2 (1x1 out) the kernel; per-batch weights need N*Ho*Wo*10 >= 32 -> N=1, 1x1 out stays a kernel
@pytest.mark.parametrize("param", ["factorized", "loralib"])
@pytest.mark.parametrize("size", [2, 4], ids=["smallN", "largeN"])
@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
def test_gradgradcheck_conv2d(pref_kind, size, param):
    torch.manual_seed(2)
    c_in, c_out, k, N = 2, 2, 2, (2 if pref_kind == "sample" else 1)
    x, weight, bias = _leaf(N, c_in, size, size), _leaf(c_out, c_in, k, k), _leaf(c_out)
    if param == "factorized":
        lora_A, lora_B = _leaf(T, R, c_in, k, k), _leaf(T, c_out, R)
    else:
        lora_A, lora_B = _leaf(T, R * k, c_in * k), _leaf(T, c_out * k, R * k)
    pref = _leaf(T, lo=0.1) if pref_kind == "batch" else _leaf(N, T, lo=0.1)
    if param == "factorized":
        P = pref.reshape(-1, T)
        assert weight_space(x, weight, P, size - 1, size - 1) == (size == 4)

    def fn(*a):
        return palora_conv2d(*a, 0.75, parameterization=param, backend="torch")

    args = (x, weight, bias, lora_A, lora_B, pref)
    assert gradgradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradgradcheck_conv2d_strided_padded():
    torch.manual_seed(3)
    x, weight = _leaf(2, 2, 5, 6), _leaf(3, 2, 3, 3)
    args = (x, weight, _leaf(3), _leaf(T, R, 2, 3, 3), _leaf(T, 3, R), _leaf(2, T, lo=0.1))
    fn = lambda *a: palora_conv2d(*a, 1.0, stride=(2, 1), padding=(1, 0), dilation=(1, 2),  # noqa: E731
                                  backend="torch")
    assert gradgradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def _penalty(fn, args):
    """A gradient penalty on lora_B through lora_A: |d(sum y^2)/d lora_A|^2, differentiated by lora_B."""
    y = fn(*args)
    (gA,) = torch.autograd.grad((y * y).sum(), args[3], create_graph=True)
    (gB,) = torch.autograd.grad((gA * gA).sum(), args[4])
    return gB


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda_sim"])
@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
def test_gradient_penalty_matches_naive_loop(pref_kind, backend):
    """fp32 on the backends that cannot take fp64 (cuda_sim) or are fastest there; fp64 oracle."""
    from palora_kernels import dispatch
    why = dispatch.why_not(backend, torch.device("cpu"), "lora_mm", torch.float32)
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    g = torch.Generator().manual_seed(4)
    N, in_f, out_f = 3, 6, 5
    shapes = [(N, in_f), (out_f, in_f), (out_f,), (T, R, in_f), (T, out_f, R), (T,) if pref_kind == "batch" else (N, T)]
    base = [torch.randn(s, generator=g, **f64) for s in shapes]
    base[-1] = base[-1].abs() + 0.1

    def leaves(dtype):
        return [b.to(dtype).requires_grad_(True) for b in base]

    want = _penalty(lambda *a: reference.palora_linear(*a, 1.5), leaves(torch.float64))
    got = _penalty(lambda *a: palora_linear(*a, 1.5, backend=backend), leaves(torch.float32))
    assert want.abs().max() > 1e-3
    assert_rel_close(got, want, torch.float32, f"gradient penalty ({backend}, {pref_kind})")
    assert TOL[torch.float32] <= 1e-5


def test_first_order_backward_without_create_graph_is_not_a_graph():
    """The fast path still runs when no graph is asked for: its gradients carry no history."""
    x, w, A, B, p = _leaf(3, 4), _leaf(2, 4), _leaf(T, R, 4), _leaf(T, 2, R), _leaf(3, T)
    gx, gA = torch.autograd.grad(palora_linear(x, w, None, A, B, p, 1.0, backend="torch").sum(), (x, A))
    assert gx.grad_fn is None and gA.grad_fn is None
    gx, gA = torch.autograd.grad(palora_linear(x, w, None, A, B, p, 1.0, backend="torch").sum(), (x, A),
                                 create_graph=True)
    assert gA.grad_fn is not None


@pytest.mark.parametrize("backend", ["torch", "cuda_sim"])
@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
def test_conv_gradient_penalty_matches_naive_loop(pref_kind, backend):
    """The factorized conv on a backend with its own data-gradient kernel (cuda_sim) and on torch."""
    from palora_kernels import dispatch
    why = dispatch.why_not(backend, torch.device("cpu"), "lora_conv2d", torch.float32)
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    g = torch.Generator().manual_seed(5)
    N = 2
    shapes = [(N, 3, 5, 5), (4, 3, 3, 3), (4,), (T, R, 3, 3, 3), (T, 4, R), (T,) if pref_kind == "batch" else (N, T)]
    base = [torch.randn(s, generator=g, **f64) for s in shapes]
    base[-1] = base[-1].abs() + 0.1

    def leaves(dtype):
        return [b.to(dtype).requires_grad_(True) for b in base]

    want = _penalty(lambda *a: reference.palora_conv2d(*a, 0.5, padding=1), leaves(torch.float64))
    got = _penalty(lambda *a: palora_conv2d(*a, 0.5, padding=1, backend=backend), leaves(torch.float32))
    assert want.abs().max() > 1e-3
    assert_rel_close(got, want, torch.float32, f"conv gradient penalty ({backend}, {pref_kind})")
