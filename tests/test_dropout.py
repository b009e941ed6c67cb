"""LoRA dropout (docs/dropout.md): the counter-based generator, then the layers.

Generator: ``_rng.philox_uniform`` must be bitwise equal to Triton's ``tl.rand`` (the Triton
kernels draw the mask in-kernel, the torch backend with ``_rng``) and to the C++ header
csrc/cuda/philox.h; the C++ fast path of ``keep_mask`` / ``dropout_input`` must give the bits of their
torch arithmetic. TRITON_INTERPRET=1 is set in conftest.py.
"""
import math

import pytest
import torch

from palora_kernels import _rng

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")     # small tensors: a second thread only spin-waits


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
    n = 60_000
    keep = _rng.keep_mask(3, 2**33 - 1000, (200, 300), p, "cpu")
    assert keep.shape == (200, 300) and keep.dtype == torch.bool
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


# ---- the C++ header (csrc/cuda/philox.h), compiled for the host into palora_kernels._C -------------
def test_cpp_header_bitwise_equals_rng():
    import palora_kernels._ext  # noqa: F401  (loads the extension, registering its ops)
    if not hasattr(torch.ops.palora, "philox_uniform"):
        pytest.skip("palora_kernels._C is not built (or predates csrc/cpu/rng_ops.cpp)")
    for seed in (0, 12345, 2**32 + 5, 2**61 + 99):
        ours = _rng.philox_uniform(seed, _OFFSETS)
        cpp = torch.ops.palora.philox_uniform(seed, _OFFSETS)
        assert torch.equal(ours.view(torch.int32), cpp.view(torch.int32)), f"seed {seed}"


def _cpp_built(name):
    import palora_kernels._ext  # noqa: F401
    if not hasattr(torch.ops.palora, name):
        pytest.skip(f"palora_kernels._C is not built (or predates palora::{name})")


def _both_ways(monkeypatch, fn):
    """fn() with the C++ fast path of _rng (keep_mask, dropout_input) and with its int64 torch arithmetic."""
    monkeypatch.setattr(_rng, "USE_CPP", True)
    fast = fn()
    monkeypatch.setattr(_rng, "USE_CPP", False)
    return fast, fn()


def _bits(t):
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, torch.int16))


@pytest.mark.parametrize("seed,offset", [(0, 0), (2**32 + 5, 2**32 - 1000), (2**61 + 99, 2**40 - 7)])
def test_cpp_keep_mask_bitwise_equals_torch(monkeypatch, seed, offset):
    _cpp_built("philox_keep")
    for p in (0.0, 0.05, 0.3, 0.9):
        fast, slow = _both_ways(monkeypatch, lambda: _rng.keep_mask(seed, offset, (37, 53), p, "cpu"))
        assert fast.dtype == torch.bool and fast.shape == (37, 53) and torch.equal(fast, slow), p
    # p is rounded to fp32 before the compare (as the kernels do): p a hair above a drawn uniform u, rounding
    # to u in fp32, keeps u in both ways (an fp64 compare would drop it)
    u = _rng.philox_uniform(seed, torch.arange(offset, offset + 64, dtype=torch.int64))
    i = int(u.argmax())
    p = float(u[i]) + 2.0**-40
    assert p != float(u[i]) and torch.tensor(p, dtype=torch.float32).item() == float(u[i])
    fast, slow = _both_ways(monkeypatch, lambda: _rng.keep_mask(seed, offset, (64,), p))
    assert bool(fast[i]) and torch.equal(fast, slow)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpp_dropout_input_bitwise_equals_torch(monkeypatch, dtype):
    _cpp_built("philox_dropout")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(41, 29, generator=g) * 3).to(dtype)
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0]).to(dtype)
    for p in (0.05, 0.3, 1 / 3):
        for xx in (x, x.t()):            # a transposed view: its own row-major order, both ways
            fast, slow = _both_ways(monkeypatch, lambda: _rng.dropout_input(xx, p, 2**33 + 1, 2**32 - 100))
            assert fast.dtype == dtype and fast.shape == xx.shape
            fast, slow = fast.contiguous(), slow.contiguous()
            # NaN where the other has NaN, every other value bit for bit (the NaN encoding itself differs:
            # torch's vectorized fp32 -> bf16 writes 0xffff for NaN, its scalar conversion 0x7fc0)
            nan = fast.isnan()
            assert torch.equal(nan, slow.isnan()) and nan.sum() >= 1, p
            assert torch.equal(_bits(fast[~nan]), _bits(slow[~nan])), (p, tuple(xx.stride()))


def test_dropout_input_keeps_the_gradient_when_x_requires_it(monkeypatch):
    _cpp_built("philox_dropout")
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    y = _rng.dropout_input(x, 0.25, 3, 2**32 - 30)     # the C++ op has no derivative: the torch product runs
    y.backward(torch.ones_like(y))
    m = _rng.keep_mask(3, 2**32 - 30, x.shape, 0.25)
    assert torch.equal(x.grad, m.double() / 0.75)
    with torch.no_grad():
        fast, slow = _both_ways(monkeypatch, lambda: _rng.dropout_input(x, 0.25, 3, 2**32 - 30))
    assert torch.equal(fast, y.detach()) and torch.equal(slow, y.detach())


# ---- the layers ------------------------------------------------------------------------------------
import palora_kernels as pk  # noqa: E402
from palora_kernels import dispatch, reference  # noqa: E402
from palora_kernels._math import use_weight_space  # noqa: E402
from palora_kernels.functional import palora_conv2d, palora_linear  # noqa: E402
from conftest import TOL, rel_err  # noqa: E402

P_DROP = 0.3
SEED = (987654321, 2**32 - 500)      # the offsets cross 2**32 inside the mask
GRAD_NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "preference")


def _inputs(kind, pref_kind, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(dtype)  # noqa: E731
    T, r = 2, 3
    if kind == "linear":
        B, L, i, o = 3, 13, 45, 29                        # N = 39 >= 2*45*29/74: weight space without dropout
        x, w, A, Bm = rnd(B, L, i), rnd(o, i), rnd(T, r, i), rnd(T, o, r)
    else:
        B, ci, co = 2, 3, 5
        x, w, A, Bm = rnd(B, ci, 7, 6), rnd(co, ci, 3, 3), rnd(T, r, ci, 3, 3), rnd(T, co, r)
    b = rnd(w.shape[0])
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    p = torch.rand(T, generator=g, dtype=pdt) if pref_kind == "batch" else torch.rand(B, T, generator=g, dtype=pdt)
    dy_shape = (B, L, o) if kind == "linear" else (B, co, 7, 6)
    dy = torch.randn(dy_shape, generator=g, dtype=torch.float64).to(dtype)
    return [t.requires_grad_(True) for t in (x, w, b, A, Bm, p)], dy


def _call(kind, leaves, **kw):
    x, w, b, A, Bm, p = leaves
    if kind == "linear":
        return palora_linear(x, w, b, A, Bm, p, 0.7, **kw)
    return palora_conv2d(x, w, b, A, Bm, p, 0.7, padding=1, **kw)


def _explicit(kind, leaves, drop_seed, p_drop=P_DROP):
    """The oracle: the reference loop with the adapters reading x * mask / (1-p), the mask made by _rng."""
    x, w, b, A, Bm, p = leaves
    x_lora = pk._rng.dropout_input(x, p_drop, *drop_seed)
    if kind == "linear":
        return reference.palora_linear(x, w, b, A, Bm, p, 0.7, x_lora=x_lora)
    return reference.palora_conv2d(x, w, b, A, Bm, p, 0.7, padding=1, x_lora=x_lora)


def _grads(y, leaves, dy):
    return dict(zip(GRAD_NAMES, torch.autograd.grad(y, leaves, dy)))


# Triton runs under the interpreter (~3-6 s each here): each path once, both preference kinds among them
LINEAR_RUNS = [("torch", None, "batch"), ("torch", None, "sample"), ("triton", "inloop", "sample"),
               ("triton", "split", "batch"), ("triton", None, "sample")]


@pytest.mark.parametrize("backend,path,pref_kind", LINEAR_RUNS,
                         ids=["torch-batch", "torch-sample", "triton-inloop-sample", "triton-split-batch",
                              "triton-auto-sample"])
def test_linear_equals_explicit_mask_composition(backend, path, pref_kind):
    from palora_kernels.backends.triton import linear as triton_linear
    leaves, dy = _inputs("linear", pref_kind)
    assert use_weight_space(39, 45, 29, torch.float64)    # so dropout must switch the weight-space path off
    y_ref = _explicit("linear", leaves, SEED)
    g_ref = _grads(y_ref, leaves, dy)
    with triton_linear.use_path(path):
        y = _call("linear", leaves, lora_dropout=P_DROP, dropout_seed=SEED, backend=backend)
        g = _grads(y, leaves, dy)
    assert rel_err(y, y_ref) <= TOL[torch.float64]
    for n in GRAD_NAMES:
        assert rel_err(g[n], g_ref[n]) <= TOL[torch.float64], f"{backend}/{path}: grad {n}"
    # the dropout did something: without it the output and dA differ by far more than rounding
    y0 = _call("linear", leaves, backend=backend)
    assert rel_err(y, y0) > 1e-3


@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
def test_conv_equals_explicit_mask_composition(pref_kind):
    leaves, dy = _inputs("conv", pref_kind)
    y_ref = _explicit("conv", leaves, SEED)
    g_ref = _grads(y_ref, leaves, dy)
    y = _call("conv", leaves, lora_dropout=P_DROP, dropout_seed=SEED)
    g = _grads(y, leaves, dy)
    assert rel_err(y, y_ref) <= TOL[torch.float64]
    for n in GRAD_NAMES:
        assert rel_err(g[n], g_ref[n]) <= TOL[torch.float64], f"grad {n}"
    assert rel_err(y, _call("conv", leaves)) > 1e-3


def test_conv_channels_last_mask_is_over_logical_nchw():
    leaves, dy = _inputs("conv", "sample")
    y_ref = _explicit("conv", leaves, SEED)
    x_cl = leaves[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = _call("conv", [x_cl] + leaves[1:], lora_dropout=P_DROP, dropout_seed=SEED)
    assert rel_err(y, y_ref) <= TOL[torch.float64]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_mask_never_saved_for_backward(kind):
    """Autograd saves no mask and no dropped copy of x: one x-sized tensor (x itself), nothing boolean."""
    leaves, _ = _inputs(kind, "sample")
    got = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: got.append(t) or t, lambda t: t):
        _call(kind, leaves, lora_dropout=P_DROP, dropout_seed=SEED, backend="torch")
    assert got and not any(t.dtype == torch.bool for t in got)
    x_sized = [t for t in got if t.numel() == leaves[0].numel()]
    assert len(x_sized) == 1 and torch.equal(x_sized[0].reshape(leaves[0].shape), leaves[0].detach())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_double_backward_with_dropout(kind):
    """create_graph through the layer: second derivatives equal those of the explicit-mask composition."""
    def second(fn):
        leaves, dy = _inputs(kind, "sample")
        y = fn(leaves)
        gx = torch.autograd.grad(y, leaves[0], dy, create_graph=True)[0]
        return torch.autograd.grad((gx ** 2).sum() + (y ** 2).sum(), leaves[1:])
    ours = second(lambda lv: _call(kind, lv, lora_dropout=P_DROP, dropout_seed=SEED, backend="torch"))
    ref = second(lambda lv: _explicit(kind, lv, SEED))
    for n, a, b in zip(GRAD_NAMES[1:], ours, ref):
        assert rel_err(a, b) <= 1e-11, f"{kind}: second derivative wrt {n}"


def _layers(kind, p_drop, dtype=torch.float64):
    from _layers import make_conv, make_linear
    if kind == "linear":
        layer = make_linear(20, 12, 2, 3, dtype=dtype, seed=3)
        x = torch.randn(4, 5, 20, dtype=dtype)
    else:
        layer = make_conv(3, 6, 3, 2, 3, padding=1, dtype=dtype, seed=3)
        x = torch.randn(2, 3, 6, 5, dtype=dtype)
    layer.lora_dropout = p_drop       # same parameters, dropout on or off
    return layer, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_eval_mode_and_p0_are_exactly_no_dropout(kind):
    layer, x = _layers(kind, P_DROP)
    p = torch.tensor([0.3, 0.7], dtype=torch.float64)
    layer.lora_dropout = 0.0
    plain = layer(x, p)
    layer.lora_dropout = P_DROP
    state = torch.get_rng_state()
    layer.eval()
    assert torch.equal(layer(x, p), plain)
    assert torch.equal(torch.get_rng_state(), state), "eval mode drew a seed"
    layer.train()
    assert not torch.allclose(layer(x, p), plain)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_deterministic_under_manual_seed(kind):
    layer, x = _layers(kind, P_DROP)
    p = torch.tensor([0.3, 0.7], dtype=torch.float64)

    def run(s):
        torch.manual_seed(s)
        layer.zero_grad(set_to_none=True)
        y = layer(x, p)
        y.square().sum().backward()
        return [y.detach()] + [t.grad.clone() for t in (layer.weight, layer.lora_A, layer.lora_B)]
    a, b, c = run(11), run(11), run(12)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_within_twice_the_same_dtype_loop(dt):
    """FlashAttention's rule (tests/test_low_precision.py) with dropout, linear, torch backend."""
    leaves64, dy64 = _inputs("linear", "sample")
    leaves = [t.detach().to(dt if i < 5 else torch.float32).requires_grad_(True) for i, t in enumerate(leaves64)]
    exact_in = [t.detach().double().requires_grad_(True) for t in leaves]
    dy = dy64.to(dt)
    y = _call("linear", leaves, lora_dropout=P_DROP, dropout_seed=SEED, backend="torch")
    g = _grads(y, leaves, dy)
    y64 = _explicit("linear", exact_in, SEED)
    g64 = _grads(y64, exact_in, dy.double())
    loop_in = [t.detach().to(dt).requires_grad_(True) for t in leaves]
    y_lo = _explicit("linear", loop_in, SEED)
    g_lo = _grads(y_lo, loop_in, dy)
    for name, got, loop, exact in [("output", y, y_lo, y64)] + [(n, g[n], g_lo[n], g64[n]) for n in GRAD_NAMES[:5]]:
        bound = 2 * rel_err(loop, exact) + rel_err(exact.to(dt), exact)
        assert rel_err(got, exact) <= bound, f"{name}: {rel_err(got, exact):.3g} > {bound:.3g}"


# ---- dispatch, errors ------------------------------------------------------------------------------
def test_cuda_backends_do_not_run_dropout():
    for name in ("cuda", "cuda_sim"):
        for op in ("lora_mm_dropout", "lora_conv2d_dropout"):
            assert "no kernel for op" in dispatch.why_not(name, torch.device("cpu"), op, torch.float32)
    leaves, _ = _inputs("linear", "batch", torch.float32)
    with pytest.raises(RuntimeError, match=r"backend 'cuda_sim' was requested for op 'lora_mm_dropout'"):
        _call("linear", leaves, lora_dropout=P_DROP, backend="cuda_sim")
    # automatic choice on CPU: the torch composition
    assert dispatch.select_backend("cpu", "lora_mm_dropout", torch.float32) == "torch"
    assert dispatch.select_backend("cpu", "lora_conv2d_dropout", torch.float32) == "torch"


def test_bad_dropout_arguments_raise_and_mutate_nothing():
    leaves, _ = _inputs("linear", "batch")
    for bad in (1.0, -0.1, "0.1", True):
        state = torch.get_rng_state()
        with pytest.raises(ValueError, match=r"lora_dropout: expected a probability in \[0, 1\)"):
            _call("linear", leaves, lora_dropout=bad)
        assert torch.equal(torch.get_rng_state(), state)
        with pytest.raises(ValueError, match="lora_dropout"):
            pk.PaLoRALinear(4, 4, num_tasks=2, rank=1, lora_dropout=bad)
    with pytest.raises(ValueError, match="parameterization='loralib'.*lora_dropout=0"):
        pk.PaLoRAConv2d(3, 4, 3, num_tasks=2, rank=1, parameterization="loralib", lora_dropout=0.1)
    from palora_kernels.backends.triton import linear as triton_linear
    with triton_linear.use_path("merged"), pytest.raises(ValueError, match="'merged'.*LoRA dropout"):
        _call("linear", leaves, lora_dropout=P_DROP, backend="triton")


@pytest.mark.parametrize("on_expand", [False, True])
def test_opcheck_lora_mm_with_dropout(on_expand):
    """The palora::lora_mm schema with its dropout arguments: fake implementation, schema, autograd."""
    g = torch.Generator().manual_seed(5)
    x, wm, down, up = (torch.randn(*s, generator=g) for s in ((9, 7), (7, 5), (7, 4), (4, 5)))
    pref = torch.rand(1, 2, generator=g)
    torch.library.opcheck(torch.ops.palora.lora_mm.default,
                          (x, wm, None, down, up, pref, 9, 0.5, "torch", P_DROP, SEED[0], SEED[1], on_expand))
    y, h = torch.ops.palora.lora_mm(x, wm, None, down, up, pref, 9, 0.5, "torch", P_DROP, SEED[0], SEED[1],
                                    on_expand)
    y0, h0 = torch.ops.palora.lora_mm(x, wm, None, down, up, pref, 9, 0.5, "torch")
    assert not torch.equal(y, y0)
    assert torch.equal(h, h0) == on_expand      # forward: H is the dropped x's; dX call: the mask is on y


def test_convert_passes_lora_dropout():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    pk.convert(model, 2, 1, lora_dropout=0.1)
    assert [m.lora_dropout for m in model if hasattr(m, "lora_dropout")] == [0.1, 0.1]
    with pytest.raises(ValueError, match=r"^0 \(Conv2d\): lora_dropout: parameterization='loralib'"):
        pk.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), 2, 1, parameterization="loralib", lora_dropout=0.1)
