"""Merging at one preference: merged_weight, merge/unmerge (bit-exact restore) and export_merged."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import palora_kernels as pk
from conftest import assert_rel_close
from _layers import assert_unchanged, make_conv, make_linear, reference_with_grads, snapshot

T = 3
KINDS = ["linear", "conv-factorized", "conv-loralib"]


def _layer(kind, bias=True):
    if kind == "linear":
        return make_linear(7, 5, T, 2, bias=bias, lora_alpha=2.0)
    return make_conv(3, 4, 3, T, 2, stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=bias,
                     lora_alpha=2.0, parameterization=kind.split("-")[1])


def _x(kind):
    torch.manual_seed(0)
    return torch.randn(4, 6, 7) if kind == "linear" else torch.randn(4, 3, 9, 8)


def _plain(layer, x, w):
    if isinstance(layer, pk.PaLoRALinear):
        return F.linear(x, w, layer.bias)
    return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation)


def _ref(layer, x, p):
    y, _ = reference_with_grads(layer, x, lambda t: t, p, lambda t: t)
    return y


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_merged_weight_matches_forward(kind, bias):
    layer, x, p = _layer(kind, bias), _x(kind), torch.tensor([0.2, 0.5, 0.3])
    w = layer.merged_weight(p)
    assert w.shape == layer.weight.shape and not w.requires_grad
    y_ref = _ref(layer, x, p)
    assert_rel_close(_plain(layer, x, w), y_ref, torch.float32, "plain op with merged_weight")
    assert_rel_close(layer(x, p), y_ref, torch.float32, "per-batch forward")


@pytest.mark.parametrize("kind", KINDS)
def test_merge_forward_unmerge(kind):
    layer, x, p = _layer(kind), _x(kind), torch.tensor([0.6, 0.1, 0.3])
    w_param, w_before = layer.weight, layer.weight.detach().clone()
    y_unmerged = layer(x, p)
    layer.merge(p)
    assert layer.merged and not torch.equal(layer.weight, w_before)
    y_ref = _ref(_restored_copy(layer, w_before), x, p)
    assert_rel_close(layer(x), y_ref, torch.float32, "merged forward, no preference")
    assert_rel_close(layer(x, p.clone()), y_ref, torch.float32, "merged forward, the same preference")
    assert_rel_close(layer(x), y_unmerged, torch.float32, "merged vs unmerged forward")
    layer.unmerge()
    assert not layer.merged
    assert layer.weight is w_param, "unmerge must restore into the same Parameter (optimisers hold it)"
    assert torch.equal(layer.weight, w_before), "unmerge must restore the weight bit for bit"
    assert torch.equal(layer(x, p), y_unmerged)


def _restored_copy(layer, w):
    """An unmerged copy of a merged layer with weight ``w`` (the reference's view of it)."""
    c = copy.deepcopy(layer)
    c._unmerged_weight = None
    with torch.no_grad():
        c.weight.copy_(w)
    return c


@pytest.mark.parametrize("kind", KINDS)
def test_merge_per_sample_preference_raises(kind):
    layer = _layer(kind)
    snap = snapshot(layer)
    with pytest.raises(ValueError, match=re.escape(f"preference: merging needs one preference for the whole "
                                                   f"batch, shape ({T},), got (4, {T})")):
        layer.merge(torch.rand(4, T))
    with pytest.raises(ValueError, match=r"preference: merging needs one preference .*got \(4, 3\)"):
        layer.merged_weight(torch.rand(4, T))
    with pytest.raises(ValueError, match=r"preference: expected finite values"):
        layer.merge(torch.tensor([0.5, float("nan"), 0.5]))
    assert not layer.merged
    assert_unchanged(layer, snap)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_with_another_preference_while_merged_raises(kind):
    layer, x, p = _layer(kind), _x(kind), torch.tensor([0.2, 0.5, 0.3])
    layer.merge(p)
    snap = snapshot(layer)
    for other in (torch.tensor([0.3, 0.5, 0.2]), p.expand(4, T)):
        with pytest.raises(ValueError, match=r"preference: the layer is merged at \[0\.2.*0\.5.*0\.3.*\]; "
                                             r"call unmerge\(\) to use another preference"):
            layer(x, other)
    assert_unchanged(layer, snap)
    with pytest.raises(RuntimeError, match=r"merge: already merged; unmerge\(\) first"):
        layer.merge(p)
    with pytest.raises(RuntimeError, match=r"merged_weight: the layer is merged"):
        layer.merged_weight(p)
    assert_unchanged(layer, snap)
    layer.unmerge()
    with pytest.raises(RuntimeError, match=r"unmerge: the layer is not merged"):
        layer.unmerge()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = _layer("conv-factorized")                               # 3 -> 4, (9, 8) -> (5, 4)
        self.conv2 = make_conv(4, 2, 3, T, 1, padding=1, parameterization="loralib", seed=5)
        self.head = make_linear(2 * 5 * 4, 3, T, 2, seed=6)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.conv1(x))).flatten(1))


def test_export_merged_model():
    model, x, p = _Net(), _x("conv"), torch.tensor([0.1, 0.7, 0.2])
    snap = snapshot(model)
    exported = pk.export_merged(model, p)
    kinds = {n: type(m) for n, m in exported.named_children()}
    assert kinds == {"conv1": nn.Conv2d, "conv2": nn.Conv2d, "head": nn.Linear}
    assert not any(isinstance(m, (pk.PaLoRALinear, pk.PaLoRAConv2d)) for m in exported.modules())
    for name in ("conv1", "conv2"):   # stride/padding/dilation carried over
        src, dst = getattr(model, name), getattr(exported, name)
        assert (dst.stride, dst.padding, dst.dilation) == (src.stride, src.padding, src.dilation)
    with pk.preference(model, p):
        y = model(x)
    assert_rel_close(exported(x), y, torch.float32, "exported model")
    assert_unchanged(model, snap)                                   # the original is left as it was
    assert isinstance(model.head, pk.PaLoRALinear) and not model.head.merged


@pytest.mark.parametrize("kind", KINDS)
def test_export_merged_single_layer(kind):
    layer, x, p = _layer(kind), _x(kind), torch.tensor([0.3, 0.3, 0.4])
    plain = pk.export_merged(layer, p)
    assert type(plain) is (nn.Linear if kind == "linear" else nn.Conv2d)
    assert_rel_close(plain(x), _ref(layer, x, p), torch.float32, "exported layer")
    with pytest.raises(ValueError, match=r"preference: merging needs one preference"):
        pk.export_merged(layer, torch.rand(2, T))


@pytest.mark.parametrize("kind", KINDS)
def test_merged_layer_checks_its_preference(kind):
    """A merged layer validates a passed preference like an unmerged one, and exporting a merged
    layer at another preference raises instead of silently exporting the merged one."""
    layer, x, p = _layer(kind), _x(kind), torch.tensor([0.2, 0.5, 0.3])
    layer.merge(p)
    snap = snapshot(layer)
    with pytest.raises(TypeError, match=r"preference: expected a torch.Tensor .*got list"):
        layer(x, [0.2, 0.5, 0.3])
    with pytest.raises(ValueError, match=r"preference: expected shape \(3,\) or \(batch, 3\), got \(2,\)"):
        layer(x, torch.rand(2))
    with pytest.raises(ValueError, match=r"preference: the layer is merged at"):
        pk.export_merged(layer, torch.tensor([0.3, 0.5, 0.2]))
    assert_unchanged(layer, snap)
    plain = pk.export_merged(layer, p)                          # the merged preference itself is fine
    assert_rel_close(plain(x), layer(x), torch.float32, "export of a merged layer")
