"""Issue 11, low precision: in fp16 and bf16 the library's error against the fp64 oracle is at most
FlashAttention's bound for the naive loop run in that same dtype:
    err(library) <= 2 * err(naive loop in dtype) + err(rounding the fp64 result to dtype)
(the last term is FlashAttention's atol, the error of merely storing the exact answer in the dtype).
Errors are max-abs relative to the oracle's max-abs (conftest.rel_err). Random shapes and seeds,
both preference kinds, linear and factorized conv, on the torch backend.

Enforced: the output and the gradients of x, weight, bias, lora_A, and lora_B (linear). Not yet
within the bound on every draw (measured, issue 11 left open for them): the preference gradient
(up to ~5x: H and dG are rounded to the dtype before their product) and the conv lora_B gradient
(up to ~2.7x: per-image partial products rounded before the sum over images).
"""
import pytest
import torch

from conftest import rel_err
from _layers import fused_with_grads, make_conv, make_linear, reference_with_grads
import palora_kernels as pk

ID = lambda t: t  # noqa: E731


def _draw(seed, kind, dt, pref_kind):
    g = torch.Generator().manual_seed(seed)
    ri = lambda a, b: int(torch.randint(a, b, (1,), generator=g))  # noqa: E731
    T, r = ri(1, 4), ri(1, 5)
    if kind == "linear":
        i, o, B, L = ri(8, 64), ri(8, 64), ri(1, 5), ri(1, 24)
        layer, x = make_linear(i, o, T, r, dtype=dt, seed=seed), torch.randn(B, L, i, generator=g)
    else:
        ci, co, B = ri(2, 9), ri(2, 9), ri(1, 4)
        layer = make_conv(ci, co, 3, T, r, padding=1, dtype=dt, seed=seed)
        x = torch.randn(B, ci, ri(3, 9), ri(3, 9), generator=g)
    p = torch.rand(T, generator=g) if pref_kind == "batch" else torch.rand(B, T, generator=g)
    return layer, x.to(dt), p


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_within_twice_the_same_dtype_loop(kind, dt, pref_kind, seed):
    layer, x, p = _draw(seed, kind, dt, pref_kind)
    with pk.use_backend("torch"):
        y, grads = fused_with_grads(layer, x, ID, p, ID)
    y64, g64 = reference_with_grads(layer, x, ID, p, ID)
    y_lo, g_lo = reference_with_grads(layer, x, ID, p, ID, dtype=dt)
    names = ["x", "weight", "bias", "lora_A"] + (["lora_B"] if kind == "linear" else [])
    for name, got, loop, exact in [("output", y, y_lo, y64)] + [(n, grads[n], g_lo[n], g64[n]) for n in names]:
        bound = 2 * rel_err(loop, exact) + rel_err(exact.to(dt), exact)
        err = rel_err(got, exact)
        assert err <= bound, f"{name}: error {err:.3g} > 2 x loop's {rel_err(loop, exact):.3g} + rounding"
