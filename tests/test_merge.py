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


# ---- merged state is part of the layer's state (issue 11) -----------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_merged_layer_refuses_another_default_preference(kind):
    """set_preference(q) / `with pk.preference(model, q)` on a merged layer raise, change nothing;
    a default set before merging that differs from the merged one makes forward raise, not
    silently return the output at the merged preference."""
    layer, x, p, q = _layer(kind), _x(kind), torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.3, 0.5, 0.2])
    layer.set_preference(q)
    layer.merge(p)
    with pytest.raises(ValueError, match=r"preference \(the layer's default.*\): the layer is merged at "
                                         r"\[0\.2.*\]; call unmerge\(\) to use another preference, got \[0\.3"):
        layer(x)
    layer.set_preference(p)                               # the merged preference itself is fine
    snap, default = snapshot(layer), layer._preference
    assert torch.equal(layer(x), layer(x, p))
    with pytest.raises(ValueError, match=r"preference: the layer is merged at .*got \[0\.3"):
        layer.set_preference(q)
    with pytest.raises(ValueError, match=r"preference: the layer is merged at .*got \(4, 3\)"):
        layer.set_preference(p.expand(4, T))
    with pytest.raises(ValueError, match=r"the layer is merged at"):
        pk.set_preference(layer, q)
    with pytest.raises(ValueError, match=r"the layer is merged at"):
        with pk.preference(layer, q):
            pass
    assert layer._preference is default
    assert_unchanged(layer, snap)
    layer.unmerge()
    layer.set_preference(q)                               # unmerged: any preference again
    assert_rel_close(layer(x), _ref(layer, x, q), torch.float32, "unmerged at q")


def test_model_preference_names_the_merged_module():
    model, p, q = _Net(), torch.tensor([0.1, 0.7, 0.2]), torch.tensor([0.2, 0.7, 0.1])
    model.conv2.merge(p)
    with pytest.raises(ValueError, match=r"^conv2: preference: the layer is merged at"):
        pk.set_preference(model, q)
    assert all(m._preference is None for m in (model.conv1, model.conv2, model.head))


@pytest.mark.parametrize("kind", KINDS)
def test_merged_state_dict_round_trips(kind):
    """A merged layer's state_dict holds the unmerged weight and merged_preference; a fresh layer
    that loads it is merged at that preference with the same weight bit for bit, computes the same
    output, and unmerges to the original weight. An unmerged layer's keys are unchanged."""
    layer, x, p = _layer(kind), _x(kind), torch.tensor([0.6, 0.1, 0.3])
    keys_unmerged = set(layer.state_dict())
    w0 = layer.weight.detach().clone()
    layer.merge(p)
    sd = layer.state_dict()
    assert set(sd) == keys_unmerged | {"merged_preference"}
    assert torch.equal(sd["weight"], w0) and torch.equal(sd["merged_preference"], p)
    fresh = _layer(kind)
    with torch.no_grad():
        for t in fresh.parameters():
            t.add_(1.0)
    fresh.load_state_dict(sd)
    assert fresh.merged and torch.equal(fresh.weight, layer.weight)
    assert torch.equal(fresh(x), layer(x))
    fresh.unmerge()
    assert torch.equal(fresh.weight, w0)
    # loading an unmerged state_dict into a merged layer unmerges it (nothing stale is kept)
    layer.load_state_dict(fresh.state_dict())
    assert not layer.merged and torch.equal(layer.weight, w0)
    # a plain module refuses the merged state_dict instead of loading a half-understood one
    if kind == "linear":
        layer.merge(p)
        with pytest.raises(RuntimeError, match="merged_preference"):
            nn.Linear(7, 5).load_state_dict(layer.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_merged_layer_deepcopy_and_pickle(kind):
    import io
    layer, x, p = _layer(kind), _x(kind), torch.tensor([0.6, 0.1, 0.3])
    w0 = layer.weight.detach().clone()
    layer.merge(p)
    y = layer(x)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for c in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        assert c.merged and torch.equal(c(x), y)
        with pytest.raises(ValueError, match="the layer is merged at"):
            c(x, torch.tensor([0.1, 0.1, 0.8]))
        c.unmerge()
        assert torch.equal(c.weight, w0)


def test_merged_model_state_dict_round_trips():
    model, x, p = _Net(), _x("conv"), torch.tensor([0.1, 0.7, 0.2])
    model.head.merge(p)
    with pk.preference(model, p):
        y = model(x)
    fresh = _Net()
    fresh.load_state_dict(model.state_dict())
    assert fresh.head.merged and not fresh.conv1.merged
    with pk.preference(fresh, p):
        assert torch.equal(fresh(x), y)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_layer_moves_its_unmerged_weight(kind):
    """.double() / .half() / .to() convert the saved unmerged weight with `weight`: unmerge then gives the
    weight an unmerged layer converted the same way has, the state_dict still holds the unmerged weight
    and merged_preference (round trip bit for bit), and a deepcopy of the converted layer keeps all that."""
    layer, x, p = _layer(kind), _x(kind), torch.tensor([0.6, 0.1, 0.3])
    plain = copy.deepcopy(layer)
    layer.merge(p)
    for conv in (lambda m: m.double(), lambda m: m.half(), lambda m: m.to(torch.float32)):
        conv(layer), conv(plain)
        assert layer._unmerged_weight.dtype == layer.weight.dtype == plain.weight.dtype
        sd = layer.state_dict()
        assert torch.equal(sd["weight"], plain.weight) and torch.equal(sd["merged_preference"], p)
        again = copy.deepcopy(layer)
        again.load_state_dict(sd)
        assert again.merged and all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), sd.values()))
        c = copy.deepcopy(layer)
        c.unmerge()
        assert torch.equal(c.weight, plain.weight)
    layer.double()
    y = layer(x.double())
    layer.unmerge()
    assert layer.weight.dtype == torch.float64 and torch.equal(layer.weight, plain.double().weight)
    # both weights went through fp16 above: they agree to fp16 rounding
    assert_rel_close(y, layer(x.double(), p), torch.float16, "merged vs unmerged after .half().double()")
