"""The palora:: custom ops: torch.library.opcheck (schema, fake impl, autograd registration,
AOT dispatch) and the C++ CPU kernel of palora::pref_grad against the torch formula."""
import os
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import palora_kernels  # noqa: F401  (registers palora::)
from conftest import assert_rel_close, rel_err
from palora_kernels import _ext, _math

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 1e-3}
needs_C = pytest.mark.skipif(not _ext._C_AVAILABLE, reason=f"palora_kernels._C is not built: {_ext._C_ERROR}")


def _mm_args(N, K, M, T, r, P, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(N * 7 + K)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    L = N // P if P > 1 else max(N, 1)
    pref = torch.rand(P, T, generator=g, dtype=dtype)
    return (rnd(N, K), rnd(K, M), rnd(M) if bias else None, rnd(K, T * r), rnd(T * r, M), pref, L, 0.5, "torch")


MM_CASES = [(13, 7, 5, 3, 2, 1, True), (12, 7, 5, 3, 2, 4, False), (1, 1, 1, 1, 1, 1, True),
            (0, 4, 3, 2, 1, 1, True), (9, 33, 17, 1, 4, 9, True)]


@pytest.mark.parametrize("case", MM_CASES, ids=lambda c: "N{}K{}M{}T{}r{}P{}b{}".format(*c))
def test_opcheck_lora_mm(case):
    args = _mm_args(*case)
    opcheck(torch.ops.palora.lora_mm.default, args)
    # and the op computes what its docstring says: (x wm + b + ((x down) * S) up, x down), y dense,
    # H's rows padded to a multiple of 16 elements
    x, wm, bias, down, up, pref, L, scale, _ = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    h = x @ down
    S = _math.row_scale(pref, case[4], scale)
    g = h * (S if pref.shape[0] == 1 else S.repeat_interleave(L, 0))
    y_got, h_got = torch.ops.palora.lora_mm(*args)
    assert y_got.is_contiguous() and (h_got.shape[0] <= 1 or h_got.stride() == (16, 1))
    assert_rel_close(y_got, x @ wm + (0 if bias is None else bias) + g @ up, torch.float32, "lora_mm y")
    assert_rel_close(h_got, h, torch.float32, "lora_mm H")


def test_lora_mm_contract_errors_name_the_argument():
    x, wm, b, down, up, pref, L, scale, be = _mm_args(12, 7, 5, 3, 2, 4)
    for bad, match in (((x, wm[:6], b, down, up, pref, L, scale, be), r"wm: expected \(7, M\), got \(6, 5\)"),
                       ((x, wm, b, down, up[:5], pref, L, scale, be), r"up: expected \(6, 5\), got \(5, 5\)"),
                       ((x, wm, b[:4], down, up, pref, L, scale, be), r"bias: expected \(5,\), got \(4,\)"),
                       ((x, wm, b, down, up, pref, 2, scale, be), r"pref: expected 1 row or .* == N = 12, got 4 \* 2"),
                       ((x, wm.double(), b, down, up, pref, L, scale, be), r"wm: expected dtype torch.float32")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.palora.lora_mm(*bad)


def _conv_args(N, P, stride, padding, dilation, bias=True):
    g = torch.Generator().manual_seed(N + 3 * P)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    C_in, C_out, T, r, k = 3, 4, 2, 2, 3
    return (rnd(N, C_in, 7, 6), rnd(C_out, C_in, k, k), rnd(T * r, C_in, k, k), rnd(C_out) if bias else None,
            rnd(C_out, T * r), torch.rand(P, T, generator=g), stride, padding, dilation, 0.5, "torch")


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("conf", [([1, 1], [1, 1], [1, 1]), ([2, 1], [0, 2], [1, 2])], ids=["sym", "asym"])
def test_opcheck_lora_conv2d(conf, per_sample):
    N = 3
    args = _conv_args(N, N if per_sample else 1, *conf, bias=not per_sample)
    opcheck(torch.ops.palora.lora_conv2d.default, args)
    cl = (args[0].contiguous(memory_format=torch.channels_last),) + args[1:]
    opcheck(torch.ops.palora.lora_conv2d.default, cl)
    y, h = torch.ops.palora.lora_conv2d(*cl)
    assert y.is_contiguous(memory_format=torch.channels_last) and h.is_contiguous(memory_format=torch.channels_last)


@needs_C
@pytest.mark.parametrize("P", [1, 4])
def test_opcheck_pref_grad(P):
    N, T, r = 12, 3, 2
    h, dg = torch.randn(N, T * r), torch.randn(N, T * r)
    L = N // P if P > 1 else N
    opcheck(torch.ops.palora.pref_grad.default, (h, dg, torch.rand(P, T), L, r, 0.5))


def _torch_pref_grad(h, dg, pref, L, r, scale):
    """The formula in plain torch: dp[p, t] = scale * sum_{n in p} sum_j H[n, t*r+j] dG[n, t*r+j]."""
    P, T = pref.shape
    return ((h * dg).reshape(P, -1, T, r).sum(dim=(1, 3)) * scale).to(pref.dtype)


@needs_C
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("shape", [(1000, 3, 4, 1), (1000, 3, 4, 8), (30, 1, 1, 30), (7, 2, 3, 1),
                                   (517, 4, 2, 11)],
                         ids=lambda s: "N{}T{}r{}P{}".format(*s))
def test_cpp_pref_grad_equals_torch_formula(shape, dtype):
    N, T, r, P = shape                                   # P > 1 divides N: one sample = N // P rows
    L = N // P if P > 1 else N
    g = torch.Generator().manual_seed(N + P)
    h = torch.randn(N, T * r, generator=g).to(dtype)
    dg = torch.randn(N, T * r, generator=g).to(dtype)
    pref = torch.rand(P, T, generator=g).to(dtype)
    out = torch.ops.palora.pref_grad(h, dg, pref, L, r, 0.75)
    assert out.shape == (P, T) and out.dtype == dtype
    exact = _torch_pref_grad(h.double(), dg.double(), pref.double(), L, r, 0.75)   # same inputs, fp64
    assert_rel_close(out, exact, dtype, "C++ pref_grad vs fp64 formula")
    formula = _torch_pref_grad(h, dg, pref, L, r, 0.75)                              # same dtype
    err_cpp, err_formula = rel_err(out, exact), rel_err(formula, exact)
    print(f"pref_grad {dtype} N={N} T={T} r={r} P={P}: C++ {err_cpp:.2e}, torch formula {err_formula:.2e}")
    # the kernel may be at most 2x as wrong as the same-dtype torch formula, plus a small eps
    assert err_cpp <= 2 * err_formula + EPS[dtype], (err_cpp, err_formula)


@needs_C
def test_cpp_pref_grad_chosen_on_cpu_and_threads_agree():
    """dispatch picks the C++ pref_grad on CPU; padded rows are read in place; 1 thread and 2 threads
    give the same sums."""
    from palora_kernels import dispatch
    assert dispatch.select_backend(torch.device("cpu"), "pref_grad", torch.float32, fallback=True) == "cpp"
    N, T, r = 4096, 3, 4
    h, dg, pref = torch.randn(N, 16)[:, :T * r], torch.randn(N, T * r), torch.rand(1, T)
    out = dispatch.kernel("cpp", "pref_grad")(h, dg, pref, N, r, 1.0)
    assert_rel_close(out, _torch_pref_grad(h.double(), dg.double(), pref.double(), N, r, 1.0), torch.float32,
                     "pref_grad")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.palora.pref_grad(h, dg, pref, N, r, 1.0)
    finally:
        torch.set_num_threads(n)
    assert_rel_close(one, out.double(), torch.float32, "1 thread vs default threads")


@needs_C
def test_cpp_pref_grad_checks_its_arguments():
    h = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match=r"R = 4 must equal T \* rank = 3 \* 2"):
        torch.ops.palora.pref_grad(h, h, torch.rand(1, 3), 6, 2, 1.0)
    with pytest.raises(RuntimeError, match=r"P \* rows_per_sample = 4 \* 2 must equal N = 6"):
        torch.ops.palora.pref_grad(h, h, torch.rand(4, 2), 2, 2, 1.0)
    with pytest.raises(RuntimeError, match=r"h and dg must be \(N, R\) of one shape"):
        torch.ops.palora.pref_grad(h, h[:5], torch.rand(1, 2), 6, 2, 1.0)


@needs_C
def test_cpp_pref_grad_empty_batch():
    """N = 0 with P = 1 (per-batch) and P = 0 (per-sample, no samples). Run in a child process:
    the first build wrote past a (0, T) output here and crashed the interpreter."""
    code = ("import torch, palora_kernels\n"
            "h = torch.randn(0, 6)\n"
            "for P in (1, 0):\n"
            "    out = torch.ops.palora.pref_grad(h, h, torch.rand(P, 3), 1, 2, 1.0)\n"
            "    assert out.shape == (P, 3) and not out.any(), out\n"
            "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT] + sys.path)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-2000:])
