"""Edge cases: an empty batch, ragged per-sample 3-D inputs, autocast on CPU."""
import pytest
import torch

from conftest import assert_rel_close
from _layers import fused_with_grads, graph_has, make_conv, make_linear, reference_with_grads

ID = lambda t: t  # noqa: E731
GRADS = ("x", "weight", "bias", "lora_A", "lora_B", "preference")


def _layer(kind):
    if kind == "linear":
        return make_linear(6, 5, 3, 2)
    return make_conv(3, 4, 3, 3, 2, padding=1, parameterization=kind.split("-")[1])


EMPTY = [("linear", (0, 6)), ("linear", (0, 4, 6)), ("linear", (2, 0, 6)),
         ("conv-factorized", (0, 3, 5, 5)), ("conv-loralib", (0, 3, 5, 5))]


@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
@pytest.mark.parametrize("kind, shape", EMPTY, ids=[f"{k}-{'x'.join(map(str, s))}" for k, s in EMPTY])
def test_empty_batch_forward_backward(kind, shape, pref_kind):
    layer = _layer(kind)
    x = torch.randn(shape)
    p = torch.rand(3) if pref_kind == "batch" else torch.rand(shape[0], 3)
    y, grads = fused_with_grads(layer, x, ID, p, ID)
    y_ref, grads_ref = reference_with_grads(layer, x, ID, p, ID)
    assert y.shape == y_ref.shape and y.numel() == 0
    for name in GRADS:
        assert grads[name] is not None and grads[name].shape == grads_ref[name].shape, name
        # nothing flowed: every gradient is exactly zero (and not NaN from an empty reduction)
        assert torch.equal(grads[name], torch.zeros_like(grads[name])), name


@pytest.mark.parametrize("B, L", [(3, 5), (1, 7), (7, 1), (4, 13)])
def test_ragged_per_sample_3d(B, L):
    """(B, L, in) with a per-sample preference: every row of sample b uses p[b]; L is odd, so
    the B*L rows never fill a power-of-two tile evenly."""
    layer = make_linear(19, 11, 4, 3, lora_alpha=3.0)
    x = torch.randn(B, L, 19)
    p = torch.rand(B, 4)
    y, grads = fused_with_grads(layer, x, ID, p, ID)
    y_ref, grads_ref = reference_with_grads(layer, x, ID, p, ID)
    assert_rel_close(y, y_ref, torch.float32, "output")
    for name in GRADS:
        assert_rel_close(grads[name], grads_ref[name], torch.float32, f"grad {name}")
    # sample b alone, with its own preference, gives the same rows
    for b in range(B):
        yb = layer(x[b], p[b])
        assert_rel_close(y[b], yb.detach(), torch.float32, f"sample {b}")


@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
@pytest.mark.parametrize("kind", ["linear", "conv-factorized", "conv-loralib"])
def test_autocast_cpu_bf16(kind, pref_kind):
    layer = _layer(kind)                                       # fp32 parameters
    x = torch.randn(4, 7, 6) if kind == "linear" else torch.randn(4, 3, 6, 5)
    p = torch.rand(3) if pref_kind == "batch" else torch.rand(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads = fused_with_grads(layer, x, ID, p, ID)
    assert y.dtype == torch.bfloat16
    if kind != "conv-loralib":
        assert graph_has(y, "PaLoRALinearFunction" if kind == "linear" else "PaLoRAConv2dFunction")
    # the oracle: fp64 on the bf16-rounded values autocast computes with
    rounded = make_linear(6, 5, 3, 2) if kind == "linear" else _layer(kind)
    with torch.no_grad():
        for name, t in rounded.named_parameters():
            t.copy_(getattr(layer, name).to(torch.bfloat16).float())
    y_ref, grads_ref = reference_with_grads(rounded, x.bfloat16(), ID, p, ID)
    assert_rel_close(y, y_ref, torch.bfloat16, "autocast output")
    for name in GRADS:
        assert grads[name].dtype == torch.float32, name          # the leaves' dtype
        assert_rel_close(grads[name], grads_ref[name], torch.bfloat16, f"autocast grad {name}")
