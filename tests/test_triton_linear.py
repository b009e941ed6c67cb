"""Triton backend of PaLoRALinear, run on CPU tensors under the Triton interpreter.

Every kernel path (in-loop shrink, split shrink, merged), every dtype, both preference kinds,
bias and no bias, ragged shapes, forward and backward, against the fp64 reference on the same
(rounded) inputs with the conftest TOL table. TRITON_INTERPRET=1 is set in conftest.py.
"""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

import palora_kernels as pk
from palora_kernels import cost_model, dispatch, reference
from conftest import TOL, assert_rel_close, rel_err

triton_linear = pytest.importorskip("palora_kernels.backends.triton.linear")
pytestmark = pytest.mark.skipif(not triton_linear.INTERPRET,
                                reason="needs TRITON_INTERPRET=1 before triton is imported (conftest sets it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CASES = [("inloop", "batch"), ("inloop", "sample"), ("split", "batch"), ("split", "sample"), ("merged", "batch")]
SCALE = 0.7                               # not a power of two: catches a scale rounded to fp32 in fp64 runs


def make(shape_x, in_f, out_f, T, r, dtype, pref_kind, bias=True, seed=0):
    """Inputs rounded to ``dtype`` (the reference sees exactly the same values, in fp64)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rnd(*shape_x, in_f)
    w = rnd(out_f, in_f) / in_f ** 0.5
    b = rnd(out_f) if bias else None
    A = rnd(T, r, in_f) / in_f ** 0.5
    B = rnd(T, out_f, r) / r ** 0.5       # non-zero B, so the adapter path matters
    p = torch.rand(T, generator=g, dtype=torch.float64) if pref_kind == "batch" else \
        torch.rand(shape_x[0], T, generator=g, dtype=torch.float64)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    return [t if t is None else t.to(dtype) for t in (x, w, b, A, B)] + [p.to(pdt)]


def stacked_args(x, w, b, A, B, p):
    """The forward lora_mm arguments of palora_linear (functional.py), for direct kernel calls."""
    x2 = x.reshape(-1, x.shape[-1])
    pref = p.reshape(1, -1) if p.dim() == 1 else p
    L = x2.shape[0] if p.dim() == 1 else x2.shape[0] // p.shape[0]
    A_cat, B_cat = pk._math.stack_A(A), pk._math.stack_B(B)
    return x2, w.t(), b, A_cat.t(), B_cat.t(), pref, L


def run_mm(*args, **kw):
    """triton lora_mm -> [y | H] for comparison, after checking the layout of the contract."""
    y, h = triton_linear.lora_mm(*args, **kw)
    assert y.is_contiguous() and (h.shape[0] <= 1 or h.stride(0) % 16 == 0) and h.stride(1) == 1
    return torch.cat([y, h], dim=1)


HALF = (torch.float16, torch.bfloat16)


def expected_z(x2, wm, b, down, up, pref, L):
    """[y | H] in fp64 from the reference loop over adapters (one rank-r block per task)."""
    T = pref.shape[1]
    R = down.shape[1]
    r = R // T
    d = lambda t: None if t is None else t.double()  # noqa: E731
    A = d(down).t().reshape(T, r, -1)
    B = d(up).t().reshape(-1, T, r).permute(1, 0, 2)
    p = d(pref)
    pref_arg = p[0] if p.shape[0] == 1 else p
    xs = d(x2) if p.shape[0] == 1 else d(x2).reshape(p.shape[0], L, -1)
    y = reference.palora_linear(xs, d(wm).t(), d(b), A, B, pref_arg, SCALE).reshape(x2.shape[0], -1)
    return torch.cat([y, d(x2) @ d(down)], dim=1)


# ---------------------------------------------------------------------------------------------
# forward: the kernel itself, every path x dtype x preference kind x bias, ragged shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path,pref_kind", CASES)
def test_lora_mm_forward(path, pref_kind, dtype, bias):
    shape_x = (37,) if pref_kind == "batch" else (5, 8)   # per-sample: samples cross 16-row tiles
    args = stacked_args(*make(shape_x, 50, 70, 2, 3, dtype, pref_kind, bias))
    if path == "merged" and dtype in HALF:       # W_eff in 16 bits would round the adapter away
        with pytest.raises(ValueError, match="'merged' forms W_eff in the input dtype"), triton_linear.use_path(path):
            triton_linear.lora_mm(*args, SCALE)
        return
    z = run_mm(*args, SCALE, path=path)
    assert z.dtype == dtype and z.shape == (args[0].shape[0], 70 + 6)
    exp = expected_z(*args)
    assert_rel_close(z[:, :70], exp[:, :70], dtype, f"{path} y")
    assert_rel_close(z[:, 70:], exp[:, 70:], dtype, f"{path} H")


@pytest.mark.parametrize("path", ["inloop", "split", "merged"])
@pytest.mark.parametrize("T,r", [(1, 1), (1, 5), (3, 24)], ids=["T1r1", "T1r5", "T3r24_R72"])
def test_lora_mm_ranks(path, T, r):
    """Rank 1, one task, and R = 72 > 64 (split/merged loop over R in chunks; in-loop refuses)."""
    args = stacked_args(*make((21,), 33, 19, T, r, torch.float32, "batch"))
    if path == "inloop" and T * r > cost_model.MAX_INLOOP_R:
        with pytest.raises(ValueError, match="inloop"), triton_linear.use_path("inloop"):
            triton_linear.lora_mm(*args, SCALE)
        return
    with triton_linear.use_path(path):
        z = run_mm(*args, SCALE)
    assert_rel_close(z, expected_z(*args), torch.float32, f"{path} T={T} r={r}")


def test_lora_mm_strided_and_empty():
    """Non-contiguous x and weights are read through their strides; an empty batch returns (0, M+R)."""
    x, w, b, A, B, p = make((40,), 48, 24, 2, 4, torch.float32, "batch")
    x_nc = x.t().contiguous().t()                     # column-major (40, 48)
    args = stacked_args(x_nc, w, b, A, B, p)
    assert args[0].stride(-1) != 1 and args[1].stride(0) == 1
    for path in ("inloop", "split", "merged"):
        z = run_mm(*args, SCALE, path=path)
        assert_rel_close(z, expected_z(*args), torch.float32, f"strided {path}")
    empty = run_mm(args[0][:0], *args[1:], SCALE)
    assert empty.shape == (0, 24 + 8)


def test_lora_mm_bad_input_names_argument():
    args = list(stacked_args(*make((8,), 16, 16, 2, 2, torch.float32, "batch")))
    args[3] = args[3][:, :3]                          # down (K, 3), R not divisible by T = 2
    with pytest.raises(RuntimeError, match=r"up: expected \(3, 16\), got \(4, 16\)"):
        torch.ops.palora.lora_mm(*args, SCALE, "triton")
    with pytest.raises(ValueError, match="merged"), triton_linear.use_path("merged"):
        triton_linear.lora_mm(*stacked_args(*make((4, 2), 16, 16, 2, 2, torch.float32, "sample")), SCALE)


def test_bf16_upcasts_only_under_interpreter(monkeypatch):
    """bf16 tl.dot is wrong in the interpreter; the upcast flag is on there and off on a GPU."""
    assert triton_linear._precision(torch.bfloat16)[0] is True
    monkeypatch.setattr(triton_linear, "INTERPRET", False)
    assert triton_linear._precision(torch.bfloat16)[0] is False
    assert triton_linear._precision(torch.float16)[0] is False


# ---------------------------------------------------------------------------------------------
# the TMA variant (sm_90): forced under the interpreter, which runs descriptor loads as masked loads
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def descriptors(monkeypatch):
    """Counts the tensor descriptors the interpreted kernels make (2 per program on the TMA path)."""
    from triton.runtime.interpreter import InterpreterBuilder
    made = []
    original = InterpreterBuilder.create_make_tensor_descriptor

    def counting(self, *a, **kw):
        made.append(a[3] if len(a) > 3 else kw.get("tensor_shape"))     # the block shape
        return original(self, *a, **kw)

    monkeypatch.setattr(InterpreterBuilder, "create_make_tensor_descriptor", counting)
    return made


TMA_DTYPES = [torch.float16, torch.bfloat16, torch.float32]    # fp32 as TF32 (the tensor-core classes)
# merged forms W_eff in the input dtype, so it runs fp32/fp64 only: no merged x fp16/bf16 case
TMA_CASES = [(path, kind, dt) for path, kind in [c for c in CASES if c[0] != "merged"] + [("merged", "batch")]
             for dt in TMA_DTYPES if path != "merged" or dt == torch.float32]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("path,pref_kind,dtype", TMA_CASES,
                         ids=[f"{p}-{k}-{str(d).split('.')[-1]}" for p, k, d in TMA_CASES])
def test_lora_mm_tma_forward_and_dx(path, pref_kind, dtype, bias, descriptors):
    """x, W and up through descriptors, vs the fp64 oracle: the forward's W^T and B_cat^T (W_T, UP_T: read
    as (out, in) and (out, R) rows) and dX's W and A_cat (read as (K, N) and (R, N) rows). in=56, out=72,
    R=8: 16-byte row strides in 2 and 4 bytes, ragged against the 16x32x16 interpreter tile in M, N, K."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")           # fp32 takes TF32 (the 'tf32' class)
    try:
        shape_x = (37,) if pref_kind == "batch" else (5, 8)
        x, w, b, A, B, p = make(shape_x, 56, 72, 2, 4, dtype, pref_kind, bias)
        fwd = stacked_args(x, w, b, A, B, p)
        x2, _, _, down, up, pref, L = fwd
        dy = torch.randn(x2.shape[0], 72, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
        dx = (dy, w, None, up.t(), down.t(), pref, L)           # dX: (dY, W, B_cat, A_cat)
        for name, args, w_t in (("forward", fwd, True), ("dX", dx, False)):
            up_arg = None if path == "merged" else args[4]
            assert triton_linear.tma_problem(args[0], args[1], triton_linear.mma_class(dtype, "tf32"), up_arg) is None
            assert triton_linear._tma_choice(args[0], args[1], up_arg, "tf32", None) == (False,) * 3  # interpreter: off
            descriptors.clear()
            with triton_linear.use_tma(True):
                z = run_mm(*args, SCALE, path=path)
            # per program: up (R, N) tile, or (BLOCK_N, BLOCK_R) read transposed (not on the merged path, whose
            # W_eff is a fresh row-major (K, N)), x (BLOCK_M, BLOCK_K), w (BLOCK_K, BLOCK_N) or (BLOCK_N, BLOCK_K)
            per = [] if path == "merged" else [[32, 16] if w_t else [16, 32]]
            per += [[16, 16], [32, 16] if w_t and path != "merged" else [16, 32]]
            assert descriptors and len(descriptors) % len(per) == 0, descriptors
            assert [list(d) for d in descriptors[:len(per)]] == per, descriptors[:len(per)]
            exp = expected_z(*args)
            n_out = args[1].shape[1]
            assert_rel_close(z[:, :n_out], exp[:, :n_out], dtype, f"TMA {path} {name} y")
            assert_rel_close(z[:, n_out:], exp[:, n_out:], dtype, f"TMA {path} {name} H")
    finally:
        torch.set_float32_matmul_precision(prev)


def test_tma_problem_names_the_constraint(descriptors):
    """Operands TMA cannot describe: the automatic choice keeps the pointer path, use_tma(True) raises."""
    x, w, b, A, B, p = make((20,), 56, 24, 2, 4, torch.float16, "batch")
    x2, wm, b, down, up, pref, L = stacked_args(x, w, b, A, B, p)
    x3, wm3, _, down3, up3, pref3, _ = stacked_args(*make((20,), 56, 24, 3, 2, torch.float16, "batch"))  # R=6
    mma = triton_linear.mma_class
    buf = torch.zeros(20 * 57 + 1, dtype=torch.float16)
    odd_row = torch.empty(20, 50, dtype=torch.float16)[:, :50].copy_(x2[:, :50])   # 100-byte rows
    cases = [
        (buf[1:1 + 20 * 56].view(20, 56).copy_(x2), wm, "16-byte aligned base"),  # 2 bytes off
        (x2.t().contiguous().t(), wm, "column stride 1"),
        (odd_row, wm[:50], "multiple of 16 bytes"),
        (x2, wm.contiguous()[:, ::2], "one stride of w equal to 1"),
    ]
    for xx, ww, msg in cases:
        assert msg in triton_linear.tma_problem(xx, ww, "tc", up), msg
        with pytest.raises(ValueError, match=r"use_tma\(True\): (x|w): TMA needs .*" + msg):
            with triton_linear.use_tma(True):
                triton_linear.lora_mm(xx, ww, None, down[: ww.shape[0]], up[:, : ww.shape[1]], pref, L, SCALE)
    # R = 6 halves: B_cat^T's 12-byte rows; the merged path (no up operand) does not need them
    assert triton_linear.tma_problem(x3, wm3, "tc", None) is None
    with pytest.raises(ValueError, match=r"up: TMA needs a row stride of a multiple of 16 bytes.* 6 elements"):
        with triton_linear.use_tma(True):
            triton_linear.lora_mm(x3, wm3, None, down3, up3, pref3, 20, SCALE, path="split")
    assert "tensor-core classes" in triton_linear.tma_problem(x2.double(), wm.double(), mma(torch.float64), up)
    assert "tensor-core classes" in triton_linear.tma_problem(x2.float(), wm.float(), mma(torch.float32, "ieee"))
    with pytest.raises(ValueError, match="LoRA dropout"), triton_linear.use_tma(True):
        triton_linear.lora_mm_dropout(x2, wm, None, down, up, pref, L, SCALE, 0.1, 1, 0, False)
    with pytest.raises(ValueError, match="on: expected True, False or None"):
        with triton_linear.use_tma("yes"):
            pass
    # automatic (and forced off): the pointer path, no descriptor made, the right answer
    descriptors.clear()
    z = run_mm(odd_row, wm[:50], None, down[:50], up, pref, L, SCALE, path="split")
    assert not descriptors
    assert_rel_close(z, expected_z(odd_row, wm[:50], None, down[:50], up, pref, L), torch.float16, "pointer path")


def test_tma_choice_on_sm90_only(monkeypatch):
    """The launcher's choice off the interpreter: sm_90 and TMA-able operands (and no dropout) only."""
    x2, wm, b, down, up, pref, L = stacked_args(*make((20,), 56, 24, 2, 4, torch.bfloat16, "batch"))
    choice = triton_linear._tma_choice
    monkeypatch.setattr(triton_linear, "INTERPRET", False)
    for family, expect in (("sm_90", (True, True, True)), ("sm_80", (False,) * 3), ("default", (False,) * 3)):
        monkeypatch.setattr(cost_model, "gpu_family", lambda device, f=family: f)
        assert choice(x2, wm, up, "ieee", None) == expect, family
        with pytest.raises(ValueError, match="TMA is compiled for sm_90 only") if family != "sm_90" else \
                contextlib.nullcontext(), triton_linear.use_tma(True):
            assert choice(x2, wm, up, "ieee", None) == (True, True, True)
    monkeypatch.setattr(cost_model, "gpu_family", lambda device: "sm_90")
    dy = torch.zeros(20, 24, dtype=torch.bfloat16)
    assert choice(dy, wm.t(), down.t(), "ieee", None) == (True, False, False)   # dX: W, A_cat as (K|R, N) rows
    assert choice(x2, wm.t().contiguous(), None, "ieee", None) == (True, False, False)   # merged: W_eff
    assert choice(x2, wm, up, "ieee", (0.1, 1, 0, False)) == (False,) * 3                # dropout
    assert choice(x2.float(), wm.float(), up.float(), "ieee", None) == (False,) * 3      # IEEE fp32
    assert choice(x2.float(), wm.float(), up.float(), "tf32", None) == (True, True, True)
    with triton_linear.use_tma(False):
        assert choice(x2, wm, up, "ieee", None) == (False,) * 3
    # the TMA-only tiles (128x256: they spill with pointer loads) reach the autotuner of TMA launches only
    named = dict(x_ptr=x2, INPUT_PRECISION="ieee", M=4096, N=4096)
    ptr = triton_linear._prune(triton_linear._ALL_CONFIGS, dict(named, TMA=False))
    tma = triton_linear._prune(triton_linear._ALL_CONFIGS, dict(named, TMA=True))
    assert ptr and all(c.loads == "any" and c.family == "sm_90" and c.mma == "tc" for c in ptr)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in tma} - {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
                                                                       for c in ptr} == {(128, 256)}
    assert cost_model.triton_tile(4096, 4096, "sm_90") == (128, 128)   # the cost model leaves 128x256 out


# ---------------------------------------------------------------------------------------------
# forward + backward through palora_linear (dX goes through the same fused kernel)
# ---------------------------------------------------------------------------------------------
def pref_grad_scale(x, A, B, p, dy):
    """s * sum_{rows of p} sum_j |H[n, t*r+j]| |dG[n, t*r+j]|  (P, T), in fp64.

    dp is a sum of N*r products that cancel (for a per-batch p: over every row), so its error is
    bounded by eps * this sum, not by eps * |dp|: the standard bound for a rounded dot product.
    The torch backend has the same error (fp16 1.3e-2, bf16 5.7e-2 of max|dp| on the nobias data)."""
    T, r = A.shape[:2]
    P = 1 if p.dim() == 1 else p.shape[0]
    H = x.reshape(-1, x.shape[-1]).double() @ pk._math.stack_A(A).double().t()
    dG = dy.reshape(-1, dy.shape[-1]).double() @ pk._math.stack_B(B).double()
    return (H.abs() * dG.abs()).reshape(P, -1, T, r).sum(dim=(1, 3)) * SCALE


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path,pref_kind", CASES)
def test_palora_linear_fwd_bwd(path, pref_kind, dtype, bias):
    shape_x = (37,) if pref_kind == "batch" else (5, 8)
    inputs = make(shape_x, 50, 70, 2, 3, dtype, pref_kind, bias, seed=1)
    leaves = [t if t is None else t.clone().requires_grad_() for t in inputs]
    refs = [t if t is None else t.detach().double().requires_grad_() for t in inputs]
    dy = torch.randn(*shape_x, 70, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)

    if path == "merged" and dtype in HALF:
        with pytest.raises(ValueError, match="'merged' forms W_eff"), triton_linear.use_path(path):
            pk.palora_linear(*leaves, SCALE, backend="triton")
        return
    with triton_linear.use_path(path):
        y = pk.palora_linear(*leaves, SCALE, backend="triton")
        y.backward(dy)
    y_ref = reference.palora_linear(*refs, SCALE)
    y_ref.backward(dy.double())

    assert y.dtype == dtype
    assert_rel_close(y, y_ref, dtype, "y")
    for name, t, r in zip(("x", "weight", "bias", "lora_A", "lora_B"), leaves, refs):
        if t is not None:
            assert_rel_close(t.grad, r.grad, dtype, f"d{name}")
    x, _, _, A, B, p = refs
    dp_err = ((leaves[5].grad.double() - p.grad).abs() / pref_grad_scale(x, A, B, p, dy)).max().item()
    assert dp_err <= TOL[dtype], f"dpreference: error {dp_err:.3g} of s*sum|H||dG| > {TOL[dtype]:g}"
    if dtype == torch.float32:
        assert_rel_close(leaves[5].grad, p.grad, dtype, "dpreference")


def test_gradcheck_fp64_triton():
    """Hand-written backward vs finite differences, fp64, per-sample preference, both fused shapes."""
    inputs = make((2, 3), 5, 6, 2, 2, torch.float64, "sample", seed=3)
    leaves = [t.clone().requires_grad_() for t in inputs]
    for path in ("inloop", "split"):
        with triton_linear.use_path(path):
            assert torch.autograd.gradcheck(
                lambda *a: pk.palora_linear(*a, SCALE, backend="triton"), leaves, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# custom op, torch.compile, dispatch
# ---------------------------------------------------------------------------------------------
def test_opcheck_lora_mm_triton():
    for pref_kind in ("batch", "sample"):
        x2, wm, b, down, up, pref, L = stacked_args(*make((6, 4) if pref_kind == "sample" else (24,),
                                                          32, 20, 2, 4, torch.float32, pref_kind))
        torch.library.opcheck(torch.ops.palora.lora_mm.default,
                              (x2, wm, b, down, up, pref, L, SCALE, "triton"))


def test_compile_fullgraph_mlp_trains_one_step_triton(monkeypatch):
    """torch.compile(fullgraph=True) of 3 PaLoRALinear layers, Triton backend under the interpreter."""
    calls = []
    kernel = dispatch.kernel("triton", "lora_mm")
    monkeypatch.setitem(dispatch._kernels, ("triton", "lora_mm"),
                        lambda *a: calls.append(a[0].shape) or kernel(*a))
    torch.manual_seed(0)
    layers = [pk.PaLoRALinear(16, 32, num_tasks=2, rank=2), pk.PaLoRALinear(32, 32, num_tasks=2, rank=2),
              pk.PaLoRALinear(32, 8, num_tasks=2, rank=2)]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B, std=0.1)   # so the adapters carry gradient
    model = torch.nn.ModuleList(layers)
    ref = [pk.PaLoRALinear(l.in_features, l.out_features, num_tasks=2, rank=2) for l in layers]
    for a, b in zip(ref, layers):
        a.load_state_dict(b.state_dict())

    def mlp(mods, x, p):
        h = torch.relu(mods[0](x, p))
        h = torch.relu(mods[1](h, p))
        return mods[2](h, p)

    x = torch.randn(4, 3, 16)
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1], [0.0, 1.0]])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch._dynamo.reset()
    step = torch.compile(lambda x, p: mlp(model, x, p).square().mean(), fullgraph=True)
    with pk.use_backend("triton"):
        loss = step(x, p)
        loss.backward()
    with pk.use_backend("reference"):
        loss_ref = mlp(ref, x, p).square().mean()
        loss_ref.backward()
    # 3 forwards + dX of layers 2 and 3 (x of layer 1 needs no grad) ran the Triton kernels
    assert len(calls) == 5, calls
    assert rel_err(loss, loss_ref) <= TOL[torch.float32]
    for (name, a), b in zip(model.named_parameters(), [q for m in ref for q in m.parameters()]):
        assert_rel_close(a.grad, b.grad, torch.float32, f"grad {name}")
    before = [q.detach().clone() for q in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dispatch_triton_cpu_under_interpreter():
    cpu = torch.device("cpu")
    assert dispatch.why_not("triton", cpu, "lora_mm", torch.float32) is None
    assert dispatch.select_backend(cpu, explicit="triton") == "triton"
    assert dispatch.select_backend(cpu) in ("cpp", "torch")   # automatic choice never takes the interpreter


def test_dispatch_reason_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import torch, palora_kernels as pk\n"
            "print(pk.dispatch.why_not('triton', torch.device('cpu'), 'lora_mm', torch.float32))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout and "before triton is imported" in out.stdout


# ---------------------------------------------------------------------------------------------
# cost model and the reports built on it
# ---------------------------------------------------------------------------------------------
def test_cost_model_choices():
    kw = dict(per_batch=True, bias=True)
    # H100, bf16, T=3 r=8, 4096 x 4096: memory bound at N=16 (the in-loop recompute is free, one launch),
    # compute bound at N=16384 (split avoids recomputing H for each of the 32 column tiles)
    assert cost_model.choose_path(16, 4096, 4096, 24, 3, torch.bfloat16, "sm_90", **kw) == "inloop"
    assert cost_model.choose_path(16384, 4096, 4096, 24, 3, torch.bfloat16, "sm_90", **kw) == "split"
    # with the cuBLAS composition allowed, its assumed 1/0.75 edge on sm_90 wins the large GEMMs
    assert cost_model.choose_path(16384, 4096, 4096, 24, 3, torch.bfloat16, "sm_90", cublas=True, **kw) == "cublas"
    t = cost_model.path_times(16384, 4096, 4096, 24, 3, torch.bfloat16, "sm_90", cublas=True, **kw)
    assert t["cublas"] < t["split"] < t["inloop"]
    assert cost_model.allowed_paths(72, per_batch=True) == ["split", "merged"]
    assert "merged" not in cost_model.allowed_paths(24, per_batch=False)
    assert cost_model.wave_efficiency(256, 4096, 128, 128, 132) == 64 / 132     # half the H100 idle
    for dt in HALF:         # W_eff in 16 bits: never picked, at any size
        assert "merged" not in cost_model.allowed_paths(24, per_batch=True, dtype=dt)
        assert cost_model.choose_path(1 << 20, 64, 64, 2, 2, dt, "sm_90", **kw) != "merged"
    unf = cost_model.path_cost("unfused", 4096, 4096, 4096, 24, 3, 2)
    fused = cost_model.path_cost("split", 4096, 4096, 4096, 24, 3, 2)
    assert unf.bytes > 2 * fused.bytes


def test_estimate_h100_runs():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "estimate_h100.py")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ESTIMATE" in out.stdout and "N=16384" in out.stdout and "unfused" in out.stdout


def test_kernel_report_all_configs_compile_without_spills():
    """Ahead-of-time compile for sm_80 and sm_90 (~50 s on 2 cores): exit 0 = no failure, no spill."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "palora_kernels.tools.kernel_report"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith("| lora_")]
    assert any("sm_80" in l and "mma/HMMA" in l for l in lines)
    assert any("sm_90" in l and "wgmma/HGMMA" in l for l in lines)
    assert len(lines) >= 30 and all(l.split("|")[-2].strip() == "ok" for l in lines)
    # the conv kernels (triton/conv2d*.py), compiled with their launchers' arguments
    assert any("lora_conv2d triton[dX" in l and "sm_90" in l and "wgmma/HGMMA" in l for l in lines)
    assert any("lora_conv2d triton[dW+dA" in l and "sm_80" in l and "mma/HMMA" in l for l in lines)
    assert any("lora_conv2d triton[fwd inloop, no-bias" in l and "sm_90" in l for l in lines)
    # the TMA variant: sm_90 only, a TMA load in its SASS, the TMA-only 128x256 tiles on it alone
    tma = [l for l in lines if l.startswith("| lora_mm[tma, ")]
    assert tma and all("| sm_90 " in l and "UTMALDG" in l and "wgmma/HGMMA" in l for l in tma)
    assert any("BM=128 BN=256" in l and "split, fwd, per-sample" in l for l in tma)
    assert not any("BN=256" in l for l in lines if l.startswith("| lora_mm[") and l not in tma)


def test_fp32_follows_torch_matmul_precision():
    """fp32 runs IEEE by default and TF32 when torch allows it, as nn.Linear does; the autotuner
    keys on the precision, and the cost model prices fp32 at the TF32 rate then."""
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert triton_linear._precision(torch.float32)[2] == "ieee"
        assert triton_linear.mma_class(torch.float32, "ieee") == "fp32"
        torch.set_float32_matmul_precision("high")
        assert triton_linear._precision(torch.float32)[2] == "tf32"
        assert triton_linear._precision(torch.bfloat16)[2] == "ieee"        # 16-bit tiles: no TF32 flag
        assert triton_linear.mma_class(torch.float32, "tf32") == "tf32"
        assert {c.mma for c in triton_linear.configs_for("sm_90", "tf32")} == {"tf32"}
        # the kernels run with input_precision="tf32" (the interpreter computes it in fp32)
        args = stacked_args(*make((21,), 33, 19, 2, 3, torch.float32, "batch"))
        assert_rel_close(run_mm(*args, SCALE, path="split"), expected_z(*args), torch.float32, "tf32 split")
        slow = cost_model.path_times(4096, 4096, 4096, 24, 3, torch.float32, "sm_90", per_batch=False)
        fast = cost_model.path_times(4096, 4096, 4096, 24, 3, torch.float32, "sm_90", per_batch=False,
                                     allow_tf32=True)
        assert fast["split"] < slow["split"] / 4                      # 494.7 vs 66.9 TFLOP/s
    finally:
        torch.set_float32_matmul_precision(prev)
