"""The linear backward's dW and dA_cat from ONE pass over x (ops/linear.py, docs/cuda.md): the conv's
palora::lora_conv2d_wgrad on x's 1x1-convolution view, on the backends whose record sets linear_wgrad
(cuda, and cuda_sim here). Under the emulator against the fp64 oracle: per-batch and per-sample
preferences (rows_per_sample 1 and > 1), a frozen base, fp32/fp16/bf16, a strided x, the 16-byte and the
scalar dY path; that the wgrad kernel really ran (a spy on the record's kernel and the emulator's launch
counter); fp16/bf16 within 2x the same-dtype loop; and the routing around it (dropout, 32-bit sizes,
backends without the flag)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import palora_kernels as pk
from conftest import assert_rel_close
from _layers import fused_with_grads, make_linear, reference_with_grads
from palora_kernels import dispatch
from palora_kernels._math import row_scale
from palora_kernels.backends import RECORDS
from palora_kernels.backends.cuda_sim import kernels as cuda_sim
from palora_kernels.ops.linear import _wgrad_1x1, one_pass_wgrad

pytestmark = pytest.mark.skipif(cuda_sim.unavailable_reason() is not None,
                                reason=f"cuda_sim unavailable: {cuda_sim.unavailable_reason()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ID = lambda t: t  # noqa: E731
calls = []


def spy_wgrad(x, dy, dg, pref, kernel_hw, stride, padding, dilation, scale, need_weight):
    calls.append(dict(x=x, dy=dy, dg=dg, need_weight=need_weight, kernel_hw=list(kernel_hw)))
    return cuda_sim.lora_conv2d_wgrad(x, dy, dg, pref, kernel_hw, stride, padding, dilation, scale, need_weight)


@pytest.fixture(scope="module")
def lib():
    return cuda_sim.build()


@pytest.fixture
def spied(monkeypatch):
    """cuda_sim with its wgrad kernel wrapped: the calls the linear backward makes are recorded."""
    rec = RECORDS["cuda_sim"]
    monkeypatch.setitem(RECORDS, "cuda_sim", dataclasses.replace(
        rec, kernels={**rec.kernels, "lora_conv2d_wgrad": f"{__name__}:spy_wgrad"}))
    dispatch.clear_cache()
    calls.clear()
    yield
    dispatch.clear_cache()


def _launches(lib):
    return cuda_sim.stats(lib)["launches"]


# x shape, preference shape, (images, rows) of the 1x1 view: per-batch (one row per image); per-sample with
# 1 and with 4 rows per sample (one image per preference row)
CASES = {"batch": ((3, 5, 40), (2,), (15, 1)), "sample-rps1": ((6, 40), (6, 2), (6, 1)),
         "sample-rps4": ((3, 4, 40), (3, 2), (3, 4))}


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_backward_takes_dW_dA_from_the_wgrad_kernel(lib, spied, dtype, case, frozen):
    xs, ps, (images, rows) = CASES[case]
    # 15 or 12 rows < 2*in*out/(in+out) = 30: the kernel path, not the effective weight (fp32 per-batch)
    layer = make_linear(40, 24, 2, 3, dtype=dtype, lora_alpha=6.0)
    layer.weight.requires_grad_(not frozen)
    g = torch.Generator().manual_seed(3)
    x, p = torch.randn(*xs, generator=g).to(dtype), torch.rand(*ps, generator=g)
    before = _launches(lib)
    with pk.use_backend("cuda_sim"):
        y, got = fused_with_grads(layer, x, ID, p, ID)
    # forward 2, dX and dG 2, dW and dA 2 (partial tiles + ordered finish), d(preference) 2
    assert _launches(lib) - before == 8
    assert len(calls) == 1 and calls[0]["need_weight"] is not frozen and calls[0]["kernel_hw"] == [1, 1]
    xv = calls[0]["x"]
    assert xv.shape == (images, 40, rows, 1) and xv.stride()[1:3] == (1, 40)          # channels_last, no copy
    y_ref, want = reference_with_grads(layer, x, ID, p, ID)
    assert_rel_close(y, y_ref, dtype, "y")
    for name, w in want.items():
        if name == "weight" and frozen:
            assert got[name] is None
            continue
        assert_rel_close(got[name], w, dtype, f"d{name}")


def _oracle(x, dy, dg, pref, rps, scale):
    """fp64 dW = dY^T x, dA_cat = (dG * S)^T x with S[n, t*r+j] = scale * pref[n // rps (or 0), t]."""
    R, T = dg.shape[1], pref.shape[1]
    S = row_scale(pref.double(), R // T, scale)
    S = S.expand(x.shape[0], R) if pref.shape[0] == 1 else S.repeat_interleave(rps, 0)
    return dy.double().t() @ x.double(), (dg.double() * S).t() @ x.double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_f", [24, 21], ids=["dY-16B", "dY-scalar"])
@pytest.mark.parametrize("P", [1, 4], ids=["batch", "sample"])
def test_one_pass_matches_fp64_on_strided_operands(lib, dtype, out_f, P):
    """x a column slice (row stride 43, not 16-byte aligned), dG with H's padded row stride, dY dense:
    16-byte cp.async dY rows when out * itemsize is a multiple of 16 (fp32 needs out % 4, fp16/bf16 % 8),
    the scalar gather otherwise. 300 rows: more than one K step of 32 pixels and ragged."""
    g = torch.Generator().manual_seed(out_f + P)
    N, in_f, T, r = 300, 40, 3, 2
    rps = N // P
    x = torch.randn(N, in_f + 3, generator=g).to(dtype)[:, :in_f]
    dy = torch.randn(N, out_f, generator=g).to(dtype)
    dg = torch.randn(N, 16, generator=g).to(dtype)[:, :T * r]
    pref = torch.rand(P, T, generator=g)
    before, copies = _launches(lib), cuda_sim.stats(lib)["async_copies"]
    with pk.use_backend("cuda_sim"):
        dW, dA = _wgrad_1x1(x, dy, dg, pref, rps, 0.7, True, "cuda_sim")
    assert _launches(lib) - before == 2
    vec = out_f * dy.element_size() % 16 == 0
    assert (cuda_sim.stats(lib)["async_copies"] > copies) == vec
    eW, eA = _oracle(x, dy, dg, pref, rps, 0.7)
    assert dW.shape == (out_f, in_f) and dA.shape == (T * r, in_f)
    assert_rel_close(dW, eW, dtype, f"dW P={P}")
    assert_rel_close(dA, eA, dtype, f"dA P={P}")
    with pk.use_backend("cuda_sim"):
        none, dA2 = _wgrad_1x1(x, dy, dg, pref, rps, 0.7, False, "cuda_sim")    # frozen base: no dW rows
    assert none is None and torch.equal(dA2, dA)


@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("seed", [1, 2])
def test_within_twice_the_same_dtype_loop(dt, pref_kind, seed):
    """FlashAttention's rule (tests/test_low_precision.py, which runs seed 0) on two more draws, with dW
    and dA now from the wgrad kernel."""
    from test_low_precision import ratios
    bad = {n: round(v, 2) for n, v in ratios("cuda_sim", "linear", dt, pref_kind, seed).items() if v > 2}
    assert not bad, f"error / same-dtype loop's error over 2x: {bad}"


def test_routing_around_the_kernel():
    """The one-pass path only where the record asks for it and the kernel takes the sizes."""
    assert one_pass_wgrad("cuda_sim", None, 100, 40, 24, 6) and one_pass_wgrad("cuda", None, 100, 40, 24, 6)
    assert not one_pass_wgrad("torch", None, 100, 40, 24, 6)          # no wgrad kernel: its measured GEMMs
    assert not one_pass_wgrad("triton", None, 100, 40, 24, 6)         # cuBLAS keeps dW (docs/cuda.md)
    assert not one_pass_wgrad("cuda_sim", (0.1, 1, 0), 100, 40, 24, 6)   # dropout: dA reads the dropped x
    assert one_pass_wgrad("cuda_sim", None, 2**30 - 1, 40, 24, 6)
    assert not one_pass_wgrad("cuda_sim", None, 2**30, 40, 24, 6)      # pixels / spatial extent >= 2^30
    assert not one_pass_wgrad("cuda_sim", None, 100, 2**26, 24, 8)     # (out + R) * in >= 2^31

