"""Issue 11, convolutions: padding="same"/"valid" and groups > 1, as nn.Conv2d does them, for
both parameterisations, per-batch and per-sample, forward and every gradient against the fp64
naive loop (whose F.conv2d takes the string padding and the groups itself)."""
import re

import pytest
import torch
from torch import nn
from torch.autograd import gradgradcheck

import palora_kernels as pk
from conftest import assert_rel_close
from _layers import fused_with_grads, make_conv, reference_with_grads

ID = lambda t: t  # noqa: E731
GRADS = ("x", "weight", "bias", "lora_A", "lora_B", "preference")
T = 3


def _check(layer, x, p, what):
    y, grads = fused_with_grads(layer, x, ID, p, ID)
    y_ref, grads_ref = reference_with_grads(layer, x, ID, p, ID)
    assert_rel_close(y, y_ref, torch.float32, f"{what}: output")
    for name in GRADS:
        assert_rel_close(grads[name], grads_ref[name], torch.float32, f"{what}: grad {name}")
    return y


PADS = [("same", 3, 1, "factorized"), ("same", 2, 1, "factorized"), ("same", 3, 2, "factorized"),
        ("same", (2, 3), (1, 2), "factorized"), ("valid", 3, 1, "factorized"),
        ("same", 3, 1, "loralib"), ("same", 2, 1, "loralib"), ("same", 3, 2, "loralib"), ("valid", 3, 1, "loralib")]


@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
@pytest.mark.parametrize("padding, k, dilation, param", PADS, ids=[f"{p}-k{k}-d{d}-{m}" for p, k, d, m in PADS])
def test_string_padding(padding, k, dilation, param, pref_kind):
    """Odd total padding (k=2, or kw=2 with dilation 2) goes on the bottom/right, as in torch."""
    layer = make_conv(3, 4, k, T, 2, padding=padding, dilation=dilation, parameterization=param)
    x = torch.randn(2, 3, 7, 6)
    p = torch.rand(T) if pref_kind == "batch" else torch.rand(2, T)
    y = _check(layer, x, p, f"padding={padding}")
    plain = nn.Conv2d(3, 4, k, padding=padding, dilation=dilation)
    assert y.shape == plain(x).shape
    if padding == "same":
        assert y.shape[2:] == x.shape[2:]
    assert layer.padding == padding


def test_same_padding_with_stride_raises_like_nn():
    with pytest.raises(ValueError, match=re.escape("padding: 'same' needs stride 1 (as nn.Conv2d), got stride (2, 2)")):
        pk.PaLoRAConv2d(3, 4, 3, stride=2, padding="same", num_tasks=2, rank=1)
    with pytest.raises(ValueError, match=re.escape("padding: expected an int, a pair of ints, 'same' or 'valid', "
                                                   "got 'full'")):
        pk.PaLoRAConv2d(3, 4, 3, padding="full", num_tasks=2, rank=1)


@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
@pytest.mark.parametrize("param", ["factorized", "loralib"])
@pytest.mark.parametrize("groups, c_in, c_out", [(2, 4, 6), (4, 4, 4)], ids=["g2", "depthwise"])
def test_groups(groups, c_in, c_out, param, pref_kind):
    layer = make_conv(c_in, c_out, 3, T, 2, padding=1, stride=(1, 2), parameterization=param, groups=groups)
    assert layer.weight.shape == (c_out, c_in // groups, 3, 3)
    if param == "loralib":     # the PaLoRA reference code's shapes
        assert layer.lora_A.shape == (T, 2 * 3, c_in * 3) and layer.lora_B.shape == (T, c_out // groups * 3, 2 * 3)
    x = torch.randn(2, c_in, 6, 7)
    p = torch.rand(T) if pref_kind == "batch" else torch.rand(2, T)
    _check(layer, x, p, f"groups={groups}")
    with pytest.raises(RuntimeError, match=r"backend 'cuda_sim' was requested for a grouped conv \(groups="):
        pk.palora_conv2d(
            x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, p, 1.0, padding=1, groups=groups,
            parameterization=param, backend="cuda_sim")


@pytest.mark.parametrize("param", ["factorized", "loralib"])
def test_grouped_from_module_at_init_and_merge(param):
    torch.manual_seed(0)
    src = nn.Conv2d(4, 6, 3, padding="same", groups=2)
    layer = pk.PaLoRAConv2d.from_module(src, num_tasks=T, rank=2, parameterization=param)
    x, p = torch.randn(2, 4, 5, 5), torch.tensor([0.2, 0.3, 0.5])
    with torch.no_grad():
        assert_rel_close(layer(x, p), src(x), torch.float32, "grouped at init")
        layer.lora_B.normal_()
        y = layer(x, p)
    if param == "factorized":
        with pytest.raises(ValueError, match=r"groups: a factorized adapter on a grouped conv \(groups=2\) mixes"):
            layer.merge(p)
        assert not layer.merged
        return
    layer.merge(p)
    with torch.no_grad():
        assert_rel_close(layer(x), y, torch.float32, "grouped loralib merged")
    plain = pk.export_merged(layer, p)
    assert plain.groups == 2 and plain.padding == "same"
    with torch.no_grad():
        assert_rel_close(plain(x), y, torch.float32, "grouped loralib exported")


@pytest.mark.parametrize("param", ["factorized", "loralib"])
@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
def test_gradgradcheck_groups_and_same(pref_kind, param):
    f64 = dict(dtype=torch.float64)
    leaf = lambda *s: torch.rand(*s, **f64).requires_grad_(True)  # noqa: E731
    x, w, b = leaf(2, 4, 4, 4), leaf(4, 2, 2, 2), leaf(4)
    A, B = (leaf(2, 2, 4, 2, 2), leaf(2, 4, 2)) if param == "factorized" else (leaf(2, 4, 8), leaf(2, 4, 4))
    p = leaf(2) if pref_kind == "batch" else leaf(2, 2)
    fn = lambda *a: pk.palora_conv2d(*a, 0.5, padding="same", groups=2, parameterization=param)  # noqa: E731
    assert gradgradcheck(fn, (x, w, b, A, B, p), eps=1e-6, atol=1e-7, rtol=1e-5)
