"""LoRA dropout (docs/dropout.md): the counter-based generator, then the layers.

Generator: ``_rng.philox_uniform`` must be bitwise equal to Triton's ``tl.rand`` (the Triton
kernels draw the mask in-kernel, the torch backend with ``_rng``) and to the C++ header
csrc/philox.h. TRITON_INTERPRET=1 is set in conftest.py.
"""
import math

import pytest
import torch

from palora_kernels import _rng

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _rand_kernel(seed, off_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    off = tl.load(off_ptr + i, mask=m, other=0)
    tl.store(out_ptr + i, tl.rand(seed, off), mask=m)


def _tl_rand(seed, offsets):
    out = torch.empty(offsets.shape, dtype=torch.float32)
    n = offsets.numel()
    _rand_kernel[(triton.cdiv(n, 64),)](seed, offsets, out, n, BLOCK=64)
    return out


# offsets around the 32-bit boundaries, where the counter's high word starts to matter
_OFFSETS = torch.cat([
    torch.arange(0, 200), torch.arange(2**31 - 50, 2**31 + 50), torch.arange(2**32 - 50, 2**32 + 50),
    torch.arange(3 * 2**32 + 7, 3 * 2**32 + 57), torch.tensor([2**40 - 1, 2**40 + 12345, 2**61 + 3]),
]).to(torch.int64)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**32 + 5, 2**61 + 99])
def test_philox_uniform_bitwise_equals_tl_rand(seed):
    ours = _rng.philox_uniform(seed, _OFFSETS)
    theirs = _tl_rand(seed, _OFFSETS)
    assert ours.dtype == torch.float32 and ours.shape == _OFFSETS.shape
    bad = (ours.view(torch.int32) != theirs.view(torch.int32)).nonzero().flatten()
    assert bad.numel() == 0, (f"seed {seed}: {bad.numel()} mismatches, first at offset "
                              f"{_OFFSETS[bad[0]].item()}: {ours[bad[0]].item()!r} vs {theirs[bad[0]].item()!r}")
    assert float(ours.min()) >= 0.0 and float(ours.max()) < 1.0


def test_philox_high_word_of_offset_matters():
    # a generator that dropped the offset's high 32 bits would repeat itself every 2**32 elements
    lo = _rng.philox_uniform(7, torch.arange(100, dtype=torch.int64))
    hi = _rng.philox_uniform(7, torch.arange(100, dtype=torch.int64) + 2**32)
    assert (lo != hi).sum() > 90


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_keep_rate(p):
    n = 200_000
    keep = _rng.keep_mask(3, 2**33 - 1000, (400, 500), p, "cpu")
    assert keep.shape == (400, 500) and keep.dtype == torch.bool
    rate = keep.double().mean().item()
    # 6 standard deviations of a binomial proportion: a biased generator (or a flipped
    # comparison, which gives rate p) fails, a fair one fails with probability ~2e-9
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 6 * sd, f"keep rate {rate:.5f}, expected {1 - p:.5f} +- {6 * sd:.5f}"


def test_keep_mask_is_row_major_flat_index():
    shape = (3, 4, 5)
    m = _rng.keep_mask(11, 2**32 + 3, shape, 0.5, "cpu")
    flat = _rng.philox_uniform(11, torch.arange(60, dtype=torch.int64) + 2**32 + 3) >= 0.5
    assert torch.equal(m, flat.view(shape))


def test_draw_seed_offset_deterministic_under_manual_seed():
    torch.manual_seed(123)
    a = [_rng.draw_seed_offset(1000) for _ in range(3)]
    torch.manual_seed(123)
    b = [_rng.draw_seed_offset(1000) for _ in range(3)]
    assert a == b
    assert len(set(a)) == 3, "successive calls must draw different streams"
    for seed, offset in a:
        assert 0 <= seed < 2**62 and 0 <= offset < 2**40


def test_dropout_input():
    x = torch.randn(6, 7, dtype=torch.float64)
    seed, offset = 5, 2**32 - 20
    y = _rng.dropout_input(x, 0.3, seed, offset)
    m = _rng.keep_mask(seed, offset, x.shape, 0.3, "cpu")
    assert torch.equal(y, torch.where(m, x / 0.7, torch.zeros_like(x)))
    assert _rng.dropout_input(x, 0.0, seed, offset) is x
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        _rng.dropout_input(x, 1.0, seed, offset)
    # the mask is over logical elements: a transposed view gets the mask of its own row-major order
    xt = x.t()
    assert torch.equal(_rng.dropout_input(xt, 0.3, seed, offset),
                       _rng.dropout_input(xt.contiguous(), 0.3, seed, offset))
