"""convert / from_module / set_preference / the preference context manager."""
import re

import pytest
import torch
from torch import nn

import palora_kernels as pk
from conftest import assert_rel_close
from _layers import randomize_


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)        # grouped: converted too (issue 11)
        self.fc1 = nn.Linear(4, 4)

    def forward(self, x):
        x = self.dw(torch.relu(self.conv(x)))
        return self.fc1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.block = Block()
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.head = nn.Linear(8, 2, bias=False)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        return self.head(torch.relu(self.fc1(x.flatten(1))))


def _net():
    torch.manual_seed(0)
    return Net()


def _x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 8, 8)


def _types(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d,
                                                                                  pk.PaLoRALinear,
                                                                                  pk.PaLoRAConv2d))}


def test_convert_swaps_every_linear_and_conv_grouped_too():
    model = _net()
    out = pk.convert(model, num_tasks=2, rank=3, lora_alpha=6.0)
    assert out is model
    assert _types(model) == {"stem": "PaLoRAConv2d", "block.conv": "PaLoRAConv2d", "block.dw": "PaLoRAConv2d",
                             "block.fc1": "PaLoRALinear", "fc1": "PaLoRALinear", "head": "PaLoRALinear"}
    for _, m in model.named_modules():
        if isinstance(m, (pk.PaLoRALinear, pk.PaLoRAConv2d)):
            assert (m.num_tasks, m.rank, m.scaling) == (2, 3, 2.0)
    assert model.stem.stride == (2, 2) and model.stem.padding == (1, 1)
    assert model.head.bias is None


def test_convert_twice_is_a_no_op():
    model = pk.convert(_net(), num_tasks=2, rank=1)
    before = {n: m for n, m in model.named_modules()}
    pk.convert(model, num_tasks=2, rank=1)
    assert {n: m for n, m in model.named_modules()} == before


def test_convert_parameterization():
    model = pk.convert(_net(), num_tasks=2, rank=1, parameterization="loralib")
    assert model.stem.parameterization == "loralib" and model.stem.lora_A.shape == (2, 3, 9)


@pytest.mark.parametrize("targets, expected", [
    (["fc1"], {"block.fc1", "fc1"}),                  # a name matches itself and any '.fc1' suffix
    (["block.fc1", "stem"], {"block.fc1", "stem"}),
    (r"block\..*", {"block.conv", "block.dw", "block.fc1"}),      # a regex, full match
    (r"(stem|head)", {"stem", "head"}),
])
def test_convert_target_modules(targets, expected):
    model = pk.convert(_net(), num_tasks=2, rank=1, target_modules=targets)
    assert {n for n, t in _types(model).items() if t.startswith("PaLoRA")} == expected


@pytest.mark.parametrize("exclude, expected", [
    (["fc1"], {"stem", "block.conv", "block.dw", "head"}),
    (r".*conv|stem", {"block.dw", "block.fc1", "fc1", "head"}),
])
def test_convert_exclude(exclude, expected):
    model = pk.convert(_net(), num_tasks=2, rank=1, exclude=exclude)
    assert {n for n, t in _types(model).items() if t.startswith("PaLoRA")} == expected


def test_convert_errors_change_nothing():
    model = _net()
    before = _types(model)
    with pytest.raises(ValueError, match=re.escape("target_modules: no nn.Linear/nn.Conv2d of the model matches "
                                                   "['nope']")):
        pk.convert(model, num_tasks=2, rank=1, target_modules=["nope"])
    model.block.odd = nn.Conv2d(4, 4, (3, 1))
    before = _types(model)
    with pytest.raises(ValueError, match=re.escape("block.odd (Conv2d): kernel_size: parameterization='loralib' "
                                                   "needs a square kernel, got (3, 1)")):
        pk.convert(model, num_tasks=2, rank=1, parameterization="loralib")
    assert _types(model) == before                                  # nothing was swapped either


@pytest.mark.parametrize("kind", ["linear", "conv-factorized", "conv-loralib"])
def test_from_module_keeps_weights(kind):
    torch.manual_seed(0)
    if kind == "linear":
        src = nn.Linear(6, 5)
        new = pk.PaLoRALinear.from_module(src, num_tasks=3, rank=2)
        x = torch.randn(4, 6)
    else:
        src = nn.Conv2d(3, 5, (3, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1))
        new = pk.PaLoRAConv2d.from_module(src, num_tasks=3, rank=2, parameterization=kind.split("-")[1])
        x = torch.randn(2, 3, 7, 9)
        assert (new.stride, new.padding, new.dilation) == (src.stride, src.padding, src.dilation)
    assert torch.equal(new.weight, src.weight) and torch.equal(new.bias, src.bias)
    assert new.weight is not src.weight                       # a copy, not shared storage
    assert new.weight.data_ptr() != src.weight.data_ptr()
    assert torch.count_nonzero(new.lora_B) == 0 and torch.count_nonzero(new.lora_A) > 0
    with torch.no_grad():
        assert_rel_close(new(x, torch.tensor([0.2, 0.3, 0.5])), src(x), torch.float32, "from_module at init")
    with pytest.raises(TypeError, match=r"layer: expected nn\.(Linear|Conv2d), got ReLU"):
        type(new).from_module(nn.ReLU(), num_tasks=3, rank=2)


@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
def test_converted_model_at_init_equals_original(pref_kind):
    original, x = _net(), _x()
    model = pk.convert(_net(), num_tasks=3, rank=2)
    p = torch.tensor([0.5, 0.3, 0.2]) if pref_kind == "batch" else torch.rand(2, 3)
    with torch.no_grad(), pk.preference(model, p):
        assert_rel_close(model(x), original(x), torch.float32, "converted model at init")


def test_set_preference_and_context_manager():
    model, x = pk.convert(_net(), num_tasks=2, rank=2), _x()
    layers = [m for m in model.modules() if isinstance(m, (pk.PaLoRALinear, pk.PaLoRAConv2d))]
    for m in layers:
        randomize_(m, seed=7)
    with pytest.raises(ValueError, match=r"preference: PaLoRAConv2d needs a preference of shape \(2,\) or "
                                         r"\(batch, 2\).*set_preference"):
        model(x)
    p1, p2 = torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9])
    pk.set_preference(model, p1)
    assert all(m._preference is p1 for m in layers)
    y1 = model(x)
    with pk.preference(model, p2) as m:
        assert m is model and all(layer._preference is p2 for layer in layers)
        y2 = model(x)
        with pk.preference(model, torch.rand(2, 2)):      # nesting, per-sample
            model(x)
        assert all(layer._preference is p2 for layer in layers)
    assert all(m._preference is p1 for m in layers)      # the previous one comes back
    assert torch.equal(model(x), y1) and not torch.allclose(y1, y2)
    with pytest.raises(KeyError):
        with pk.preference(model, p2):
            raise KeyError("restored on error too")
    assert all(m._preference is p1 for m in layers)
    pk.set_preference(model, None)
    with pytest.raises(ValueError, match=r"preference: .*needs a preference"):
        model(x)
    with pk.preference(model, p2):
        model(x)
    assert all(m._preference is None for m in layers)
    with pytest.raises(ValueError, match=r"model: expected at least one PaLoRA layer"):
        pk.set_preference(nn.Sequential(nn.Linear(2, 2)), p1)


@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
def test_preference_gets_a_gradient(pref_kind):
    layer = randomize_(pk.PaLoRALinear(6, 4, num_tasks=3, rank=2), seed=3)
    model = nn.Sequential(layer)
    x = torch.randn(5, 2, 6)
    p = torch.rand(3) if pref_kind == "batch" else torch.rand(5, 3)
    p_leaf = p.clone().requires_grad_(True)
    with pk.preference(model, p_leaf):
        model(x).square().sum().backward()
    assert p_leaf.grad is not None and p_leaf.grad.shape == p.shape
    # vs the fp64 reference of the same loss
    pr = p.double().requires_grad_(True)
    layer64 = randomize_(pk.PaLoRALinear(6, 4, num_tasks=3, rank=2, dtype=torch.float64), seed=3)
    torch.testing.assert_close(layer64.weight.float(), layer.weight)
    pk.reference.palora_linear(x.double(), layer64.weight, layer64.bias, layer64.lora_A, layer64.lora_B, pr,
                               layer64.scaling).square().sum().backward()
    assert_rel_close(p_leaf.grad, pr.grad, torch.float32, "preference grad")
