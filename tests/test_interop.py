"""palora_kernels.interop: the PaLoRA reference code's checkpoints and PEFT LoRA checkpoints.

Neither library is installed here: the checkpoints are built from their documented key layouts
(interop's module docstring says what was checked), filled with random fp64 values, and the
source model's output is computed in the test by the source's own formula, written out:
    PaLoRA reference: linear  F.linear(x, W, b) + sum_t ray_t * scaling * x A_t^T B_t^T
                      conv    conv(x, W + scaling * sum_t ray_t (B_t A_t).view(W.shape)), grouped
    PEFT:             base(x) + sum_t scaling_t * lora_B_t(lora_A_t(x)), scaling alpha/r or alpha/sqrt(r)
The loaded PaLoRA model must reproduce them to fp64 rounding (TOL[float64])."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import palora_kernels as pk
from conftest import assert_rel_close
from palora_kernels import interop

f64 = torch.float64


class RefNet(nn.Module):
    """The architecture both sides share (the base model)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding="same", groups=2)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 2, bias=False)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.head(torch.relu(self.fc(x.mean((2, 3)))))


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=f64) * 0.5


# ------------------------------------------------------------------------------------ PaLoRA reference
T, R, ALPHA = 3, 2, 4.0


def _reference_checkpoint():
    """RefNet converted by the reference code (PaConv2d / PaLinear), as its state_dict holds it."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    convs = {"conv1": (4, 3, 3, 1), "conv2": (6, 4, 3, 2)}     # C_out, C_in, k, groups
    for m, (co, ci, k, gr) in convs.items():
        sd[f"{m}.conv.weight"], sd[f"{m}.conv.bias"] = _rand(g, co, ci // gr, k, k), _rand(g, co)
        for t in range(T):
            sd[f"{m}.lora_A.{t}"] = _rand(g, R * k, ci * k)
            sd[f"{m}.lora_B.{t}"] = _rand(g, co // gr * k, R * k)
    sd["bn.weight"], sd["bn.bias"] = _rand(g, 4), _rand(g, 4)
    sd["bn.running_mean"], sd["bn.running_var"] = _rand(g, 4), _rand(g, 4).abs() + 0.5
    sd["bn.num_batches_tracked"] = torch.tensor(7)
    for m, (o, i, bias) in {"fc": (5, 6, True), "head": (2, 5, False)}.items():
        sd[f"{m}.weight"] = _rand(g, o, i)
        if bias:
            sd[f"{m}.bias"] = _rand(g, o)
        for t in range(T):
            sd[f"{m}.lora_A.{t}"], sd[f"{m}.lora_B.{t}"] = _rand(g, R, i), _rand(g, o, R)
    return sd


def _reference_forward(sd, x, ray):
    """What the reference's PaConv2d / PaLinear compute (one ray for the batch), eval-mode BN."""
    s = ALPHA / R

    def conv(m, x, padding, groups):
        w = sd[f"{m}.conv.weight"]
        skip = sum(ray[t] * sd[f"{m}.lora_B.{t}"] @ sd[f"{m}.lora_A.{t}"] for t in range(T))
        return F.conv2d(x, w + skip.view(w.shape) * s, sd[f"{m}.conv.bias"], padding=padding, groups=groups)

    def linear(m, x):
        y = F.linear(x, sd[f"{m}.weight"], sd.get(f"{m}.bias"))
        return y + sum(ray[t] * (x @ sd[f"{m}.lora_A.{t}"].t() @ sd[f"{m}.lora_B.{t}"].t()) for t in range(T)) * s

    x = conv("conv1", x, 1, 1)
    x = F.batch_norm(x, sd["bn.running_mean"], sd["bn.running_var"], sd["bn.weight"], sd["bn.bias"], False)
    x = conv("conv2", torch.relu(x), "same", 2)
    return linear("head", torch.relu(linear("fc", x.mean((2, 3)))))


def _palora_refnet():
    return pk.convert(RefNet().double(), num_tasks=T, rank=R, lora_alpha=ALPHA, parameterization="loralib").eval()


@pytest.mark.parametrize("as_file", [False, True], ids=["state_dict", "file"])
def test_palora_reference_load_reproduces_outputs(as_file, tmp_path):
    sd = _reference_checkpoint()
    source = sd
    if as_file:
        source = tmp_path / "last.ckpt"
        torch.save({"state_dict": sd, "epoch": 3}, source)
    model = interop.from_palora_reference(_palora_refnet(), source)
    x = torch.randn(2, 3, 6, 5, dtype=f64)
    for ray in (torch.tensor([0.2, 0.5, 0.3], dtype=f64), torch.tensor([1.0, 0.0, 0.0], dtype=f64)):
        with torch.no_grad():
            assert_rel_close(_run(model, x, ray), _reference_forward(sd, x, ray), f64,
                             f"reference model at {ray.tolist()}")


def _run(model, x, p):
    with torch.no_grad(), pk.preference(model, p):
        return model(x)


def test_palora_reference_round_trip_exact():
    sd = _reference_checkpoint()
    model = interop.from_palora_reference(_palora_refnet(), {"state_dict": sd})
    model.fc.merge(torch.tensor([0.1, 0.6, 0.3], dtype=f64))       # merged layers are saved unmerged
    back = interop.to_palora_reference(model)["state_dict"]
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_palora_reference_errors_name_the_layer():
    sd = _reference_checkpoint()
    with pytest.raises(ValueError, match=r"conv1: the PaLoRA reference's conv adapters .*expected "
                                         r"parameterization='loralib', got 'factorized'"):
        interop.from_palora_reference(pk.convert(RefNet().double(), num_tasks=T, rank=R), sd)
    with pytest.raises(ValueError, match=r"conv1: expected 4 tasks \(the layer's num_tasks\), got 3"):
        interop.from_palora_reference(pk.convert(RefNet().double(), num_tasks=4, rank=R,
                                                 parameterization="loralib"), sd)
    del sd["fc.lora_B.1"]
    with pytest.raises(KeyError, match=r"fc: expected key 'fc.lora_B.1' in the checkpoint"):
        interop.from_palora_reference(_palora_refnet(), sd)


# ------------------------------------------------------------------------------------ PEFT
TASKS = [dict(r=2, lora_alpha=4.0), dict(r=4, lora_alpha=8.0, use_rslora=True),
         dict(r=1, lora_alpha=3.0, alpha_pattern={"fc": 5.0})]


class PeftNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).mean((2, 3)))))


def _peft_adapters():
    """Per task: {module: (lora_A weight, lora_B weight)} in PEFT's shapes."""
    g = torch.Generator().manual_seed(1)
    out = []
    for cfg in TASKS:
        r = cfg["r"]
        out.append({"conv": (_rand(g, r, 3, 3, 3), _rand(g, 4, r, 1, 1)),
                    "fc": (_rand(g, r, 4), _rand(g, 5, r)), "head": (_rand(g, r, 5), _rand(g, 2, r))})
    return out


def _scaling(cfg, module):
    alpha = cfg.get("alpha_pattern", {}).get(module, cfg["lora_alpha"])
    return alpha / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])


def _peft_forward(base, adapters, x, weights):
    """PEFT's LoRA forward with every adapter t active, its delta weighted by weights[t] (1 or 0 is
    exactly PEFT's set_adapter; a fraction is the PaLoRA mix it has no API for)."""
    def delta(m, h, lin):
        return sum(w * _scaling(cfg, m) * lin(m, h, ad[m]) for w, cfg, ad in zip(weights, TASKS, adapters))

    conv_lora = lambda m, h, ab: F.conv2d(F.conv2d(h, ab[0], stride=2, padding=1), ab[1])  # noqa: E731
    lin_lora = lambda m, h, ab: h @ ab[0].t() @ ab[1].t()  # noqa: E731
    h = base.conv(x) + delta("conv", x, conv_lora)
    h = torch.relu(h).mean((2, 3))
    h = torch.relu(base.fc(h) + delta("fc", h, lin_lora))
    return base.head(h) + delta("head", h, lin_lora)


def _full_state_dict(base, adapters, names):
    sd = {}
    for k, v in base.state_dict().items():
        m, _, param = k.rpartition(".")
        sd[f"base_model.model.{m}.base_layer.{param}"] = v
    for name, ad in zip(names, adapters):
        for m, (A, B) in ad.items():
            sd[f"base_model.model.{m}.lora_A.{name}.weight"] = A
            sd[f"base_model.model.{m}.lora_B.{name}.weight"] = B
    return sd


def _saved_adapter(ad):
    return {f"base_model.model.{m}.lora_{w}.weight": t for m, (A, B) in ad.items() for w, t in (("A", A), ("B", B))}


@pytest.mark.parametrize("layout", ["full", "per_task"])
def test_peft_load_reproduces_outputs(layout):
    torch.manual_seed(2)
    base, adapters = PeftNet().double(), _peft_adapters()
    model = pk.convert(PeftNet().double(), num_tasks=3, rank=4, lora_alpha=1.0)     # other init: overwritten
    if layout == "full":
        interop.from_peft(model, _full_state_dict(base, adapters, ["a", "b", "c"]), TASKS, adapter_names=["a", "b", "c"])
    else:
        interop.from_peft(model, [_saved_adapter(ad) for ad in adapters], TASKS, base_state_dict=base.state_dict())
    x = torch.randn(3, 3, 7, 6, dtype=f64)
    for w in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.2, 0.5, 0.3]):
        with torch.no_grad():
            want = _peft_forward(base, adapters, x, w)
        assert_rel_close(_run(model, x, torch.tensor(w, dtype=f64)), want, f64, f"PEFT, adapters weighted {w}")
    p = torch.rand(3, 3, dtype=f64)                       # per-sample: each row its own mix
    want = torch.stack([_peft_forward(base, adapters, x[i:i + 1], p[i].tolist())[0] for i in range(3)])
    assert_rel_close(_run(model, x, p), want, f64, "PEFT, per-sample mix")


def test_peft_errors():
    base, adapters = PeftNet().double(), _peft_adapters()
    small = pk.convert(PeftNet().double(), num_tasks=3, rank=2)
    with pytest.raises(ValueError, match=r"conv: expected adapter ranks <= the layer's rank 2 .*got r = 4 for task 1"):
        interop.from_peft(small, [_saved_adapter(ad) for ad in adapters], TASKS)
    model = pk.convert(PeftNet().double(), num_tasks=3, rank=4)
    extra = [_saved_adapter(ad) for ad in adapters]
    extra[0]["base_model.model.fc.lora_magnitude_vector.weight"] = torch.ones(5, dtype=f64)   # DoRA: not LoRA
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapters: expected every LoRA tensor to belong .*lora_magnitude_vector"):
        interop.from_peft(model, extra, TASKS)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())       # nothing loaded
    with pytest.raises(ValueError, match=r"configs: expected one per task \(3\), got 2"):
        interop.from_peft(model, [_saved_adapter(ad) for ad in adapters], TASKS[:2])
    with pytest.raises(ValueError, match=r"conv: PEFT conv adapters .*expected parameterization='factorized'"):
        interop.from_peft(pk.convert(PeftNet().double(), num_tasks=3, rank=4, parameterization="loralib"),
                          [_saved_adapter(ad) for ad in adapters], TASKS)


def _trained_peftnet(rank_fc=4):
    """PeftNet converted with unequal ranks/alphas per layer, every parameter random (a trained base too)."""
    model = pk.convert(PeftNet().double(), num_tasks=3, rank=3, lora_alpha=2.0, target_modules=["conv", "head"])
    pk.convert(model, num_tasks=3, rank=rank_fc, lora_alpha=5.0, target_modules=["fc"])
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for t in model.parameters():
            t.copy_(_rand(g, *t.shape))
    return model


def test_peft_save_round_trip(tmp_path):
    """load(save(model)) into a model of another rank and alpha reproduces the outputs at per-sample
    preferences to fp64 rounding (a merged layer is saved unmerged); the files are PEFT's per-adapter layout
    (keys, shapes, adapter_config.json with rank_pattern / alpha_pattern for the layer that differs), and
    PEFT's forward over them (its formula, written out) is the model at the one-hot preferences."""
    import json
    model = _trained_peftnet()
    model.fc.merge(torch.tensor([0.2, 0.3, 0.5], dtype=f64))          # saved unmerged, as PEFT stores adapters
    x, p = torch.randn(4, 3, 6, 6, dtype=f64), torch.rand(4, 3, dtype=f64)
    with pytest.raises(ValueError, match="the layer is merged at"):
        with pk.preference(model, p):
            model(x)
    model.fc.unmerge()
    with pk.preference(model, p):
        want = model(x)
    model.fc.merge(torch.tensor([0.2, 0.3, 0.5], dtype=f64))
    interop.save_peft(model, tmp_path, ["t0", "t1", "t2"])
    cfg = json.loads((tmp_path / "t1" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3 and cfg["lora_alpha"] == 2.0
    assert cfg["target_modules"] == ["conv", "fc", "head"] and cfg["rank_pattern"] == {"fc": 4}
    assert cfg["alpha_pattern"] == {"fc": 5.0}
    ad = torch.load(tmp_path / "t1" / "adapter_model.bin", weights_only=True)
    assert sorted(ad) == sorted(f"base_model.model.{m}.lora_{w}.weight" for m in ("conv", "fc", "head") for w in "AB")
    assert ad["base_model.model.conv.lora_B.weight"].shape == (4, 3, 1, 1)
    assert ad["base_model.model.fc.lora_A.weight"].shape == (4, 4)
    fresh = pk.convert(PeftNet().double(), num_tasks=3, rank=4, lora_alpha=1.0)
    interop.load_peft(fresh, tmp_path, ["t0", "t1", "t2"])
    with pk.preference(fresh, p):
        assert_rel_close(fresh(x), want, f64, "loaded vs saved model")
    # PEFT's forward over the saved files: adapter t alone is the model at e_t
    base = PeftNet().double()
    base.load_state_dict(torch.load(tmp_path / "base_model.pt", weights_only=True))
    saved = [torch.load(tmp_path / n / "adapter_model.bin", weights_only=True) for n in ("t0", "t1", "t2")]
    adapters = [{m: (s[f"base_model.model.{m}.lora_A.weight"], s[f"base_model.model.{m}.lora_B.weight"])
                 for m in ("conv", "fc", "head")} for s in saved]
    model.fc.unmerge()
    scaling = {"conv": 2.0 / 3, "fc": 5.0 / 4, "head": 2.0 / 3}          # lora_alpha / r of each layer
    for t, ad in enumerate(adapters):
        lora = lambda m, h: scaling[m] * h @ ad[m][0].t() @ ad[m][1].t()  # noqa: E731
        h = base.conv(x) + scaling["conv"] * F.conv2d(F.conv2d(x, ad["conv"][0], stride=2, padding=1), ad["conv"][1])
        h = torch.relu(h).mean((2, 3))
        h = torch.relu(base.fc(h) + lora("fc", h))
        peft = base.head(h) + lora("head", h)
        with pk.preference(model, torch.eye(3, dtype=f64)[t]):
            assert_rel_close(model(x), peft, f64, f"PEFT's forward with adapter {t} vs the model at e_{t}")


def test_peft_save_refuses_what_peft_cannot_hold(tmp_path):
    loralib = pk.convert(PeftNet().double(), num_tasks=2, rank=2, parameterization="loralib")
    with pytest.raises(ValueError, match=r"^conv: PEFT conv adapters .* got 'loralib'"):
        interop.to_peft(loralib)
    with pytest.raises(ValueError, match=r"^model: expected at least one PaLoRA layer"):
        interop.to_peft(PeftNet())
    with pytest.raises(ValueError, match=r"^adapter_names: expected 3 distinct names"):
        interop.save_peft(_trained_peftnet(), tmp_path, ["a", "a", "b"])
