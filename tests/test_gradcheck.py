"""torch.autograd.gradcheck in fp64 of the hand-written backwards (backend "torch"):
x, weight, bias, lora_A, lora_B and the preference, per-batch (T,) and per-sample (B, T),
for the linear op, the factorized conv and the loralib conv."""
import pytest
import torch
from torch.autograd import gradcheck

from _layers import graph_has
from palora_kernels import palora_conv2d, palora_linear

f64 = dict(dtype=torch.float64)


def _leaf(*shape, lo=-1.0, hi=1.0):
    return (torch.rand(*shape, **f64) * (hi - lo) + lo).requires_grad_(True)


@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
@pytest.mark.parametrize("x_dim", [2, 3])
def test_gradcheck_linear(pref_kind, x_dim):
    torch.manual_seed(0)
    T, r, in_f, out_f, B, L = 3, 2, 5, 4, 3, 2
    x = _leaf(B, in_f) if x_dim == 2 else _leaf(B, L, in_f)
    weight, bias = _leaf(out_f, in_f), _leaf(out_f)
    lora_A, lora_B = _leaf(T, r, in_f), _leaf(T, out_f, r)
    pref = _leaf(T, lo=0.0) if pref_kind == "batch" else _leaf(B, T, lo=0.0)

    def fn(x, weight, bias, lora_A, lora_B, pref):
        return palora_linear(x, weight, bias, lora_A, lora_B, pref, 1.5, backend="torch")

    assert graph_has(fn(x, weight, bias, lora_A, lora_B, pref), "PaLoRALinearFunction")
    assert gradcheck(fn, (x, weight, bias, lora_A, lora_B, pref), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_linear_no_bias_rank1_one_task():
    torch.manual_seed(1)
    x, weight = _leaf(4, 3), _leaf(2, 3)
    lora_A, lora_B, pref = _leaf(1, 1, 3), _leaf(1, 2, 1), _leaf(4, 1, lo=0.0)
    fn = lambda *a: palora_linear(a[0], a[1], None, a[2], a[3], a[4], 0.5, backend="torch")  # noqa: E731
    assert gradcheck(fn, (x, weight, lora_A, lora_B, pref), eps=1e-6, atol=1e-7, rtol=1e-5)


CONV_CASES = [  # (stride, padding, dilation): symmetric and asymmetric
    (1, 1, 1),
    ((2, 1), (0, 1), (1, 2)),
]


@pytest.mark.parametrize("conf", CONV_CASES, ids=["s1p1d1", "asym"])
@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
@pytest.mark.parametrize("param", ["factorized", "loralib"])
def test_gradcheck_conv2d(param, pref_kind, conf):
    torch.manual_seed(2)
    stride, padding, dilation = conf
    T, r, c_in, c_out, k, N = 2, 2, 3, 2, 3, 2
    x = _leaf(N, c_in, 6, 5)
    weight, bias = _leaf(c_out, c_in, k, k), _leaf(c_out)
    if param == "factorized":
        lora_A, lora_B = _leaf(T, r, c_in, k, k), _leaf(T, c_out, r)
    else:
        lora_A, lora_B = _leaf(T, r * k, c_in * k), _leaf(T, c_out * k, r * k)
    pref = _leaf(T, lo=0.0) if pref_kind == "batch" else _leaf(N, T, lo=0.0)

    def fn(x, weight, bias, lora_A, lora_B, pref):
        return palora_conv2d(x, weight, bias, lora_A, lora_B, pref, 0.75, stride=stride, padding=padding,
                             dilation=dilation, parameterization=param, backend="torch")

    if param == "factorized":
        assert graph_has(fn(x, weight, bias, lora_A, lora_B, pref), "PaLoRAConv2dFunction")
    assert gradcheck(fn, (x, weight, bias, lora_A, lora_B, pref), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("param", ["factorized", "loralib"])
def test_gradcheck_conv2d_no_bias(param):
    torch.manual_seed(3)
    T, r, k = 1, 1, 2
    x, weight = _leaf(3, 2, 4, 4), _leaf(2, 2, k, k)
    if param == "factorized":
        lora_A, lora_B = _leaf(T, r, 2, k, k), _leaf(T, 2, r)
    else:
        lora_A, lora_B = _leaf(T, r * k, 2 * k), _leaf(T, 2 * k, r * k)
    pref = _leaf(3, T, lo=0.0)
    fn = lambda *a: palora_conv2d(a[0], a[1], None, a[2], a[3], a[4], 1.0, parameterization=param,  # noqa: E731
                                  backend="torch")
    assert gradcheck(fn, (x, weight, lora_A, lora_B, pref), eps=1e-6, atol=1e-7, rtol=1e-5)
