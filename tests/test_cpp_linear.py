"""The cpp backend's linear path: palora::lowrank_shrink / lowrank_tmm / lowrank_dual (AVX2 fp32 kernels, at::mm
otherwise)
against fp64, on the shapes that reach every tile and tail of the kernels, and PaLoRALinear on the cpp backend
against the fp64 reference loop, output and every gradient."""
import pytest
import torch

import palora_kernels as pk
from conftest import assert_rel_close
from _layers import fused_with_grads, make_linear, reference_with_grads
from palora_kernels import _ext, dispatch

pytestmark = pytest.mark.skipif(not _ext._C_AVAILABLE, reason=f"palora_kernels._C is not built: {_ext._C_ERROR}")
ID = lambda t: t  # noqa: E731

# N: the 4-row tiles and 1-3 tail rows, and the 16-row pack blocks; K: 8/16-column steps and 1-15 tail
# columns; R: the 3- (shrink) and 6-wide (tmm) column groups and their 1-2 / 1-5 tails
SHAPES = [(1, 1, 1), (3, 7, 2), (4, 8, 3), (5, 16, 6), (17, 33, 12), (33, 1024, 12), (64, 100, 7), (19, 47, 20),
          (130, 257, 5), (0, 8, 3), (6, 0, 3)]


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("N,K,R", SHAPES, ids=lambda v: str(v))
def test_shrink_matches_fp64(N, K, R, dtype):
    x, m = _rand(N, K, seed=N + K, dtype=dtype), _rand(R, K, seed=R, dtype=dtype)
    h = torch.ops.palora.lowrank_shrink(x, m, 16)
    assert h.shape == (N, R) and h.dtype == dtype and (N <= 1 or h.stride() == (-(-R // 16) * 16, 1))
    assert_rel_close(h, x.double() @ m.double().t(), dtype, "shrink")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("N,K,R", SHAPES, ids=lambda v: str(v))
def test_tmm_matches_fp64(N, K, R, dtype):
    g, v = _rand(N, R, seed=R + 1, dtype=dtype), _rand(N, K, seed=N * K + 2, dtype=dtype)
    out = torch.ops.palora.lowrank_tmm(g, v)
    assert out.shape == (R, K) and out.dtype == dtype
    assert_rel_close(out, g.double().t() @ v.double(), dtype, "tmm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("N,K,R", SHAPES, ids=lambda v: str(v))
def test_dual_matches_fp64(N, K, R, dtype):
    """(v m^T, g^T v) in one pass: both results as the two ops give them, g one column wider than m (the ones
    column of the bias gradient) so the two widths differ; N = 300 and 600 also split rows over the threads."""
    v, m, g = _rand(N, K, seed=N + 3, dtype=dtype), _rand(R, K, seed=R + 4, dtype=dtype), _rand(N, R + 1, seed=5, dtype=dtype)
    h, gtv = torch.ops.palora.lowrank_dual(v, m, g, 16)
    assert h.shape == (N, R) and (N <= 1 or h.stride() == (-(-R // 16) * 16, 1)) and gtv.shape == (R + 1, K)
    assert h.dtype == gtv.dtype == dtype
    assert_rel_close(h, v.double() @ m.double().t(), dtype, "dual v m^T")
    assert_rel_close(gtv, g.double().t() @ v.double(), dtype, "dual g^T v")


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("N,K,R", SHAPES, ids=lambda v: str(v))
def test_expand_matches_fp64(N, K, R, dtype, with_bias):
    """g up + bias, dense (N, M): K plays M here, so the 16-column tiles and 1-15 tail columns, the 4-row tiles and
    1-3 tail rows all run; a fresh output, every element written."""
    g, up = _rand(N, R, seed=N + 20, dtype=dtype), _rand(R, K, seed=K + 21, dtype=dtype)
    bias = _rand(K, seed=22, dtype=dtype) if with_bias else None
    y = torch.ops.palora.lowrank_expand(g, up, bias)
    assert y.shape == (N, K) and y.dtype == dtype and y.is_contiguous()
    want = g.double() @ up.double() + (bias.double() if with_bias else 0)
    assert_rel_close(y, want, dtype, "expand")


def test_expand_reads_strided_g_and_transposed_up():
    """g at its own row stride (H's padded buffer), a transposed up (B_cat^T as the forward passes it)."""
    g = _rand(37, 32, seed=23)[:, 3:14]
    upt = _rand(70, 11, seed=24).t()
    y = torch.ops.palora.lowrank_expand(g, upt, _rand(70, seed=25))
    assert_rel_close(y, g.double() @ upt.double() + _rand(70, seed=25).double(), torch.float32, "strided expand")


@pytest.mark.parametrize("N", [300, 600, 1000])
def test_dual_splits_rows_over_threads(N):
    v, m, g = _rand(N, 70, seed=11), _rand(12, 70, seed=12), _rand(N, 13, seed=13)
    h, gtv = torch.ops.palora.lowrank_dual(v, m, g, 16)
    assert_rel_close(h, v.double() @ m.double().t(), torch.float32, "dual v m^T")
    assert_rel_close(gtv, g.double().t() @ v.double(), torch.float32, "dual g^T v")
    assert gtv.untyped_storage().nbytes() == gtv.numel() * gtv.element_size()


def test_strided_rows_and_transposed_operands():
    """Rows read in place at their own stride (a column slice of a wider tensor, an H with padded rows);
    a transposed m (B_cat^T, as the backward passes it) and a transposed g take the general path."""
    wide = _rand(37, 90, seed=1)
    x, m = wide[:, 5:74], _rand(11, 69, seed=2)                       # ldx 90, K 69
    assert_rel_close(torch.ops.palora.lowrank_shrink(x, m, 16), x.double() @ m.double().t(), torch.float32, "strided x")
    mt = _rand(69, 11, seed=3).t()                                     # stride (1, 11)
    assert_rel_close(torch.ops.palora.lowrank_shrink(x, mt, 16), x.double() @ mt.double().t(), torch.float32, "m^T")
    g = _rand(37, 32, seed=4)[:, 3:14]                                 # ldg 32, R 11
    assert_rel_close(torch.ops.palora.lowrank_tmm(g, x), g.double().t() @ x.double(), torch.float32, "strided g")
    gt = _rand(11, 37, seed=5).t()
    assert_rel_close(torch.ops.palora.lowrank_tmm(gt, x), gt.double().t() @ x.double(), torch.float32, "g^T")
    for mm, gg in ((m, g), (mt, gt)):
        h, gtv = torch.ops.palora.lowrank_dual(x, mm, gg, 16)
        assert_rel_close(h, x.double() @ mm.double().t(), torch.float32, "dual strided v")
        assert_rel_close(gtv, gg.double().t() @ x.double(), torch.float32, "dual strided g")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_tmm_is_deterministic_for_a_thread_count(threads):
    """One fp32 partial per thread, summed in thread order: the same bits on every call."""
    g, v = _rand(1000, 12, seed=6), _rand(1000, 300, seed=7)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.ops.palora.lowrank_tmm(g, v), torch.ops.palora.lowrank_tmm(g, v)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b)
    assert_rel_close(a, g.double().t() @ v.double(), torch.float32, "tmm")
    # its own storage: a view of the per-thread partials would keep them all alive as a parameter's .grad
    assert a.untyped_storage().nbytes() == a.numel() * a.element_size()


def test_errors_name_the_argument():
    x = torch.randn(4, 8)
    for call, match in ((lambda: torch.ops.palora.lowrank_shrink(x, torch.randn(3, 7), 16), r"m must be \(R, 8\)"),
                        (lambda: torch.ops.palora.lowrank_shrink(x[0], torch.randn(3, 8), 16), r"x must be 2-D"),
                        (lambda: torch.ops.palora.lowrank_shrink(x, torch.randn(3, 8).double(), 16), r"m must be"),
                        (lambda: torch.ops.palora.lowrank_shrink(x, torch.randn(3, 8), 0), r"row_align must be >= 1"),
                        (lambda: torch.ops.palora.lowrank_tmm(torch.randn(5, 3), x), r"g must be \(4, R\)"),
                        (lambda: torch.ops.palora.lowrank_dual(x, torch.randn(3, 7), torch.randn(4, 2), 16),
                         r"lowrank_dual: m must be \(R, 8\)"),
                        (lambda: torch.ops.palora.lowrank_dual(x, torch.randn(3, 8), torch.randn(5, 2), 16),
                         r"lowrank_dual: g must be \(4, R\)"),
                        (lambda: torch.ops.palora.lowrank_dual(x, torch.randn(3, 8), torch.randn(4, 2), 0),
                         r"lowrank_dual: row_align must be >= 1"),
                        (lambda: torch.ops.palora.lowrank_expand(x, torch.randn(7, 5), None),
                         r"lowrank_expand: up must be \(8, R\)"),
                        (lambda: torch.ops.palora.lowrank_expand(x, torch.randn(8, 5), torch.randn(4)),
                         r"lowrank_expand: bias must be \(5\)"),
                        (lambda: torch.ops.palora.lowrank_expand(x, torch.randn(8, 5), torch.randn(5).double()),
                         r"lowrank_expand: bias must be Float")):
        with pytest.raises(RuntimeError, match=match):
            call()


def test_cpp_is_the_automatic_choice_for_the_linear_ops_on_cpu():
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert dispatch.select_backend(torch.device("cpu"), "lora_mm", dt) == "cpp"
        assert dispatch.select_backend(torch.device("cpu"), "lora_tmm", dt) == "cpp"
    # the conv ops are torch's: cpp has no kernel for them
    assert dispatch.select_backend(torch.device("cpu"), "lora_conv2d", torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="it has no kernel for op 'lora_conv2d'"):
        dispatch.select_backend(torch.device("cpu"), "lora_conv2d", torch.float32, "cpp")


def _layer_case(in_f, out_f, T, r, B, L, pref_kind, dtype, seed):
    layer = make_linear(in_f, out_f, T, r, seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, in_f, generator=g).to(dtype)
    p = torch.rand(T, generator=g) if pref_kind == "batch" else torch.rand(B, T, generator=g)
    return layer, x, p.to(dtype)


# in_f/out_f past the 16-column tiles with tails; R = T*r from 1 to 20
LAYERS = [(67, 45, 3, 4, 5, 7), (16, 32, 1, 1, 2, 3), (130, 33, 4, 5, 3, 11), (24, 17, 2, 3, 1, 1)]


@pytest.fixture
def kernels_at_any_size(monkeypatch):
    """The C++ kernels on these small shapes too (the backend uses them from 2^18 elements of x)."""
    from palora_kernels.backends import cpp
    monkeypatch.setattr(cpp, "FAST_MIN_ELEMENTS", 0)
    monkeypatch.setattr(cpp, "FAST_MAX_R", 10 ** 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: "i{}o{}T{}r{}B{}L{}".format(*s))
def test_layer_on_cpp_matches_fp64_reference(shape, pref_kind, dtype, kernels_at_any_size):
    layer, x, p = _layer_case(*shape, pref_kind, dtype, seed=sum(shape))
    with pk.use_backend("cpp"):
        y, grads = fused_with_grads(layer, x, ID, p, ID)
    y_ref, g_ref = reference_with_grads(layer, x, ID, p, ID)
    assert_rel_close(y, y_ref, dtype, "output")
    for name in ("x", "weight", "bias", "lora_A", "lora_B", "preference"):
        assert_rel_close(grads[name], g_ref[name], dtype, f"grad {name}")


@pytest.mark.parametrize("in_f,out_f,want", [
    (1024, 24, {"lowrank_shrink": 1, "lowrank_expand": 1, "lowrank_tmm": 1}),
    (1024, 1024, {"lowrank_shrink": 1, "lowrank_expand": 2, "lowrank_dual": 1, "lowrank_tmm": 1}),
    (40, 24, {})], ids=["x-past-crossover", "x-and-dy-past-crossover", "below-crossover"])
def test_layer_on_cpp_runs_the_cpp_kernels_past_the_crossover(monkeypatch, in_f, out_f, want):
    """The cpp backend's forward and backward call the C++ ops for H, dG, dA and dB where the operand they read
    has >= 2^18 elements and R <= 24, and none below (there the torch backend's ops run). 256 rows: x is past the
    crossover at in = 1024 (H, dA; y written by lowrank_expand), dY at out = 1024 (dG, dB and db in one
    lowrank_dual; dX written by lowrank_expand)."""
    calls = []
    for name in ("lowrank_shrink", "lowrank_tmm", "lowrank_dual", "lowrank_expand"):
        fn = getattr(torch.ops.palora, name)
        monkeypatch.setattr(torch.ops.palora, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    layer, x, p = _layer_case(in_f, out_f, 3, 2, 4, 64, "sample", torch.float32, seed=0)   # 256 rows
    with pk.use_backend("cpp"):
        fused_with_grads(layer, x, ID, p, ID)
    assert {n: calls.count(n) for n in set(calls)} == want, calls


@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
                                  (False, False, False), (True, True, False)], ids=lambda n: "x{:d}B{:d}b{:d}".format(*n))
def test_dgrad_matches_fp64_for_every_set_of_needed_grads(kernels_at_any_size, pref_kind, need):
    """cpp's lora_mm_dgrad on its one-pass path (dG, dB_cat^T, db from lowrank_dual; dX expand-first) against the
    fp64 formulas, for each subset of the gradients the layer asks for."""
    from palora_kernels._math import apply_row_scale
    from palora_kernels.backends import cpp
    need_x, need_B, need_b = need
    N, in_f, out_f, T, r, scale = 70, 45, 37, 3, 2, 0.7
    dy, W = _rand(N, out_f, seed=1), _rand(out_f, in_f, seed=2)
    A_cat, B_cat, h = _rand(T * r, in_f, seed=3), _rand(out_f, T * r, seed=4), _rand(N, T * r, seed=5)
    rows = 7 if pref_kind == "sample" else N
    pref = torch.rand(N // rows, T, generator=torch.Generator().manual_seed(6)) + 0.1
    dx, dg, dbt, db = cpp.lora_mm_dgrad(dy, W, B_cat, A_cat, h, pref, rows, scale, need_x, need_B, need_b)
    d = {k: t.double() for k, t in dict(dy=dy, W=W, A=A_cat, B=B_cat, h=h, p=pref).items()}
    dg64 = d["dy"] @ d["B"]
    assert_rel_close(dg, dg64, torch.float32, "dG")
    if need_x:
        want = d["dy"] @ d["W"] + apply_row_scale(dg64, d["p"], rows, r, scale) @ d["A"]
        assert dx.is_contiguous()
        assert_rel_close(dx, want, torch.float32, "dX")
    if need_B:
        assert_rel_close(dbt, apply_row_scale(d["h"], d["p"], rows, r, scale).t() @ d["dy"], torch.float32, "dB^T")
    if need_b:
        assert db.shape == (out_f,) and db.untyped_storage().nbytes() == out_f * 4
        assert_rel_close(db, d["dy"].sum(0), torch.float32, "db")
    assert (dx is None) != need_x and (dbt is None) != need_B and (db is None) != need_b


def test_below_the_crossover_cpp_is_bitwise_torch():
    """Small layers (the MultiLeNet's) give the torch backend's bits on cpp: training results do not move."""
    layer, x, p = _layer_case(50, 30, 2, 4, 8, 16, "sample", torch.float32, seed=3)
    out = {}
    for name in ("torch", "cpp"):
        with pk.use_backend(name):
            out[name] = fused_with_grads(layer, x, ID, p, ID)
    assert torch.equal(out["torch"][0], out["cpp"][0])
    for g in out["torch"][1]:
        assert torch.equal(out["torch"][1][g], out["cpp"][1][g]), g


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_values_propagate_like_the_fp64_product(bad):
    """Inf/NaN in a row of x (in the 8-wide body and in the tail columns) give the fp64 GEMM's pattern."""
    x, m, g = _rand(9, 43, seed=8), _rand(5, 43, seed=9), _rand(9, 5, seed=10)
    x[2, 3], x[6, 41] = bad, -bad
    for got, want in ((torch.ops.palora.lowrank_shrink(x, m, 16), x.double() @ m.double().t()),
                      (torch.ops.palora.lowrank_tmm(g, x), g.double().t() @ x.double())):
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
        fin = torch.isfinite(want)
        assert_rel_close(got[fin], want[fin], torch.float32, "finite entries")


@pytest.mark.parametrize("N", [5, 300])
def test_opcheck_lowrank_ops(N):
    """Schema, fake implementation (shapes and strides, for torch.compile) and dispatch of the four C++ ops."""
    from torch.library import opcheck
    v, m, g = _rand(N, 40, seed=30), _rand(6, 40, seed=31), _rand(N, 7, seed=32)
    opcheck(torch.ops.palora.lowrank_shrink.default, (v, m, 16))
    opcheck(torch.ops.palora.lowrank_tmm.default, (g, v))
    opcheck(torch.ops.palora.lowrank_dual.default, (v, m, g, 16))
    opcheck(torch.ops.palora.lowrank_expand.default, (g, _rand(7, 40, seed=33), _rand(40, seed=34)))
    opcheck(torch.ops.palora.lowrank_expand.default, (g, _rand(7, 40, seed=33), None))


def test_the_op_benchmark_compares_like_with_like():
    """benchmarks/linear_cpu_backends.py --ops times each C++ op against torch ops that compute the same thing."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "linear_cpu_backends.py")
    spec = importlib.util.spec_from_file_location("linear_cpu_backends", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, (cpp_fn, torch_fn) in mod.op_pairs(N=70, K=45, R=5).items():
        got, want = cpp_fn(), torch_fn()
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        flat_got = list(got)
        if name.startswith("dual"):      # (v m^T, [g | 1]^T v) against (v m^T, g^T v, sum_n v)
            flat_got = [got[0], got[1][:-1], got[1][-1]]
        assert len(flat_got) == len(want), name
        for a, b in zip(flat_got, want):
            assert_rel_close(a, b.double(), torch.float32, name)


def test_cpp_layer_compiles_fullgraph_past_the_crossover():
    """torch.compile(fullgraph=True) traces the cpp path with the C++ ops (their fakes) in the forward and the
    backward's lora_mm_dgrad, and gives eager's output and gradients."""
    layer, x, p = _layer_case(1024, 1024, 3, 2, 4, 64, "sample", torch.float32, seed=4)      # 256 x 1024: fast path

    def loss(xx, pp):
        return layer(xx, pp).square().mean()

    results = []
    with pk.use_backend("cpp"):
        for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
            layer.zero_grad(set_to_none=True)
            xx = x.detach().clone().requires_grad_(True)
            out = fn(xx, p)
            out.backward()
            results.append([out.detach(), xx.grad] + [t.grad for t in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
