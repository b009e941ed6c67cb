"""Edge cases: an empty batch (conv: on every backend), zero channels and empty images (refused as nn.Conv2d
refuses them), ragged per-sample 3-D inputs, autocast on CPU."""
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


BACKENDS = ["torch", "cuda_sim", "triton", "reference"]
OPS = {"factorized": "lora_conv2d", "loralib": "loralib_conv2d"}


def _skip_unless_runs(backend, par):
    from palora_kernels import dispatch
    reason = dispatch.why_not(backend, torch.device("cpu"), OPS[par], torch.float32)
    if reason is not None:
        pytest.skip(f"backend {backend} does not run {OPS[par]} here: {reason}")


@pytest.mark.parametrize("par", ["factorized", "loralib"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_empty_batch_every_backend(backend, par):
    """N = 0: an empty output of nn.Conv2d's shape and exactly-zero gradients on every backend."""
    import palora_kernels as pk
    _skip_unless_runs(backend, par)
    layer = make_conv(3, 4, 3, 2, 2, padding=1, parameterization=par)
    x, p = torch.randn(0, 3, 5, 6), torch.rand(0, 2)
    with pk.use_backend(backend):
        y, grads = fused_with_grads(layer, x, ID, p, ID)
    assert y.shape == torch.nn.functional.conv2d(x, layer.weight.detach(), padding=1).shape == (0, 4, 5, 6)
    for name in GRADS:
        assert grads[name] is not None and torch.equal(grads[name], torch.zeros_like(grads[name])), name


@pytest.mark.parametrize("par", ["factorized", "loralib"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_zero_channels_and_empty_images_raise(backend, par):
    """C_out = 0 and an empty image (H or W = 0) make nn.Conv2d raise; C_in = 0 makes it return a tensor with
    0 channels instead of C_out. All three raise a ValueError naming the argument here, before any backend
    runs (so every backend answers alike), and the layers refuse 0 channels when built."""
    import palora_kernels as pk
    from torch import nn
    with pytest.raises(RuntimeError):
        nn.Conv2d(3, 0, 1)(torch.randn(2, 3, 4, 4))
    with pytest.raises(RuntimeError):
        nn.Conv2d(3, 2, 1, padding=1)(torch.randn(2, 3, 0, 4))
    assert nn.Conv2d(0, 3, 1)(torch.randn(2, 0, 4, 4)).shape == (2, 0, 4, 4)       # not (2, 3, 4, 4)
    fact = par == "factorized"
    A = lambda ci: torch.randn(2, 2, ci, 1, 1) if fact else torch.randn(2, 2, ci)    # noqa: E731
    B = lambda co: torch.randn(2, co, 2) if fact else torch.randn(2, co, 2)          # noqa: E731
    p = torch.tensor([0.3, 0.7])
    w_msg, x_msg = r"^weight: expected C_out .* got shape ", r"^x: expected an image of H, W >= 1 .* got shape "
    cases = [(torch.randn(2, 0, 4, 4), torch.randn(3, 0, 1, 1), A(0), B(3), w_msg + r"\(3, 0, 1, 1\)"),
             (torch.randn(2, 3, 4, 4), torch.randn(0, 3, 1, 1), A(3), B(0), w_msg + r"\(0, 3, 1, 1\)"),
             (torch.randn(2, 3, 0, 4), torch.randn(3, 3, 1, 1), A(3), B(3), x_msg + r"\(2, 3, 0, 4\)"),
             (torch.randn(2, 3, 4, 0), torch.randn(3, 3, 1, 1), A(3), B(3), x_msg + r"\(2, 3, 4, 0\)")]
    for x, w, a, b, msg in cases:
        with pytest.raises(ValueError, match=msg):
            pk.palora_conv2d(x, w, None, a, b, p, 1.0, padding=1, parameterization=par, backend=backend)
    for ci, co in ((0, 3), (3, 0)):
        with pytest.raises(ValueError, match=r"^(in|out)_channels: expected an int >= 1, got 0"):
            pk.PaLoRAConv2d(ci, co, 1, num_tasks=2, rank=2, parameterization=par)
