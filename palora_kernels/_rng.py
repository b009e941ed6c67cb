"""Counter-based random numbers for LoRA dropout (docs/dropout.md).

The dropout mask is a pure function of (seed, offset, element index), so the
backward regenerates it instead of storing it. The generator is Triton's
``tl.rand`` (Philox-4x32, 10 rounds), reproduced bitwise here in int64 torch
arithmetic so that the torch backend, the Triton kernels and the C++ header
``csrc/cuda/philox.h`` draw the same mask for the same (seed, offset).

On the CPU, ``keep_mask`` and ``dropout_input`` run the header's C++ ops ``palora::philox_keep`` /
``palora::philox_dropout`` (csrc/cpu/rng_ops.cpp) when palora_kernels._C is loaded: the int64 arithmetic
below makes ~150 passes over 8-byte counters (0.2-0.25 s for a 3136 x 96 mask on this project's CPUs).
Both ways give the same bits (tests/test_dropout.py); ``philox_uniform`` stays torch ops, the oracle.

Layout, as in triton/language/random.py (3.8.0):
  key     = (seed & 0xffffffff, seed >> 32)        seed as uint64
  counter = (offset & 0xffffffff, offset >> 32, 0, 0)
  u32     = c0 after 10 rounds
  uniform = float32(i32 < 0 ? ~i32 : i32) * float32(4.6566127342e-10),  i32 = bitcast(u32)
"""
import torch

__all__ = ["philox_uniform", "keep_mask", "draw_seed_offset", "dropout_input", "dropout_with_mask"]

_ROUNDS = 10
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_M32 = 0xFFFFFFFF
_SCALE = 4.6566127342e-10  # rounded to fp32 in the multiply, as Triton's constant is
# seeds and offsets stay below 2**62 so offset + numel never wraps int64
_SEED_BITS = 62
_OFFSET_BITS = 40


def _mul32(a: int, x: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product a * x, a and x < 2**32.

    int64 cannot hold the product, so x is split in 16-bit halves: both
    partial products are < 2**48 and nothing overflows.
    """
    p_lo = a * (x & 0xFFFF)
    p_hi = a * (x >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox_u32(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Raw Philox output (Triton's ``tl.randint``) as int64 values in [0, 2**32)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _M32, seed >> 32
    offsets = offsets.to(torch.int64)
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32  # arithmetic shift then truncate, as Triton's .to(uint32)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1), bitwise equal to Triton's ``tl.rand(seed, offsets)``.

    offsets: int64 tensor of any shape (values may exceed 2**32); the result has its shape.
    """
    u = philox_u32(seed, offsets)
    # bitcast to int32, then x < 0 -> ~x: i.e. u if u < 2**31 else 2**32 - 1 - u
    v = torch.where(u >= 2**31, _M32 - u, u)
    scale = torch.tensor(_SCALE, dtype=torch.float32, device=v.device)
    return v.to(torch.float32) * scale


USE_CPP = True    # tests switch the C++ fast path off to compare both ways


def _cpp_op(name: str, device):
    """torch.ops.palora.<name> when the extension registered it and ``device`` is the CPU, else None."""
    if not USE_CPP or torch.device("cpu" if device is None else device).type != "cpu":
        return None
    from . import _ext
    return getattr(torch.ops.palora, name, None) if _ext._C_AVAILABLE else None


def keep_mask(seed: int, offset: int, shape, p: float, device=None) -> torch.Tensor:
    """Bool mask of ``shape``: row-major flat element i is kept iff uniform(seed, offset + i) >= p."""
    shape = torch.Size(shape)
    op = _cpp_op("philox_keep", device)
    if op is not None:
        return op(int(seed), int(offset), shape.numel(), float(p)).view(shape)
    idx = torch.arange(shape.numel(), dtype=torch.int64, device=device) + int(offset)
    return (philox_uniform(seed, idx) >= p).view(shape)


def draw_seed_offset(numel: int):
    """(seed, offset) for one dropout call over ``numel`` elements.

    Drawn from torch's default CPU generator, so ``torch.manual_seed`` makes a
    run reproducible. offset < 2**40 and numel < 2**62 keep offset + i in int64.
    """
    if numel < 0 or numel >= 2**62:
        raise ValueError(f"draw_seed_offset: numel must be in [0, 2**62), got {numel}")
    seed = int(torch.randint(0, 2**_SEED_BITS, (1,), dtype=torch.int64).item())
    offset = int(torch.randint(0, 2**_OFFSET_BITS, (1,), dtype=torch.int64).item())
    return seed, offset


def dropout_input(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """x * keep_mask(seed, offset, x.shape, p) / (1 - p): the adapters' input under dropout.

    The mask is over x's logical row-major elements, whatever x's strides.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_input: p must be in [0, 1), got {p}")
    if p == 0.0:
        return x
    op = _cpp_op("philox_dropout", x.device)
    # the C++ op has no derivative: where autograd must see the mask, the torch product below
    if op is not None and x.dtype in _CPP_DTYPES and not (x.requires_grad and torch.is_grad_enabled()):
        return op(x, float(p), int(seed), int(offset))
    return dropout_with_mask(x, keep_mask(seed, offset, x.shape, p, x.device), p)


_CPP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def dropout_with_mask(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """x * mask / (1 - p) for a mask of keep_mask's: dropout_input's arithmetic, to reuse one mask twice."""
    return x * mask.to(x.dtype) / (1.0 - p)
