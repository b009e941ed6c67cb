"""MTLoRA's CUDA C++ kernels (csrc/cuda/mtlora_mm.cuh) under the host emulator (backend cuda_sim).

The layers MTLoRALinear / MTLoRAQKV run forward and backward with backend="cuda_sim" and are compared with
the reference class (palora_kernels.reference, the MTLoRA reference forward as separate matmuls) run in
fp64 with autograd: every output and every gradient (x, task inputs, every trainable parameter). fp32 to
the fp32 tolerance; fp16/bf16 within 2x the error of the same reference composition run in that dtype plus
the rounding of the exact answer (docs/testing.md). Every call also checks the sentinel and guard bands of
its outputs (cuda_sim.kernels). Shapes are small: the emulator runs 128 fibers per block.
"""
import copy

import pytest
import torch

from conftest import TOL, rel_err
import palora_kernels as pk
from palora_kernels import reference
from palora_kernels.backends.cuda_sim import kernels as cuda_sim

pytestmark = [pytest.mark.skipif(cuda_sim.unavailable_reason() is not None,
                                 reason=f"cuda_sim unavailable: {cuda_sim.unavailable_reason()}"),
              pytest.mark.usefixtures("one_thread")]

TASKS = ["seg", "depth", "normals"]
MODES = ["matrix", "matrixv2", "lora_only", "addition"]


@pytest.fixture(scope="module")
def lib():
    return cuda_sim.build()


def make(mode, cls=pk.MTLoRALinear, r=None, in_f=21, out_f=19, dtype=torch.float32, seed=0, dropout=0.0):
    """A layer with trainable scales, unequal ranks and non-zero B (B = 0 at init)."""
    torch.manual_seed(seed)
    r = r if r is not None else {"shared": 5, "seg": 2, "depth": 3, "normals": 4}
    m = cls(in_f, out_f, r=r, lora_shared_scale=1.5, lora_task_scale={t: 0.5 + 0.25 * i for i, t in enumerate(TASKS)},
            lora_dropout=dropout, tasks=TASKS, trainable_scale_shared=True, trainable_scale_per_task=True,
            shared_mode=mode, dtype=torch.float32)
    with torch.no_grad():
        for n, prm in m.named_parameters():
            if "lora_" in n and prm.dim() == 2:
                prm.normal_(0, 0.3)
            if "scale" in n:
                prm.add_(0.1)
    return m.to(dtype)


def inputs(in_f, tasks, with_tasks, dtype, shape=(2, 9), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, in_f, generator=g).to(dtype)
    xt = {t: torch.randn(*shape, in_f, generator=g).to(dtype) for t in tasks} if with_tasks and tasks else None
    return x, xt


def ref_fn(m, x, xt):
    return reference.mtlora_linear(m, x, xt) if isinstance(m, pk.MTLoRALinear) else reference.mtlora_qkv(m, x, xt)


def outputs_and_grads(m, x, xt, fn, seed=5):
    """The outputs and the gradients of x, the task inputs and every trainable parameter for a random
    upstream gradient on every output."""
    x = x.clone().requires_grad_()
    xt = {k: v.clone().requires_grad_() for k, v in xt.items()} if xt else None
    y, lt = fn(m, x, xt)
    outs = [y] + ([lt[t] for t in sorted(lt)] if lt is not None else [])
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o.dtype)).sum() for o in outs)
    names = ["x"] + [f"x_tasks.{k}" for k in (xt or {})] + [n for n, p in m.named_parameters() if p.requires_grad]
    wrt = [x] + (list(xt.values()) if xt else []) + [p for p in m.parameters() if p.requires_grad]
    return outs, dict(zip(names, torch.autograd.grad(loss, wrt, allow_unused=True)))


def sim(m, x, xt):
    return m(x, xt, backend="cuda_sim")


def _scales_as_one(grads):
    """The trainable scales' gradients as one vector: each is a (1,) sum over N x rank products whose
    value can cancel to near 0, so, as for every other gradient tensor, the error is relative to the
    largest element of the vector (e.g. QKV addition fp32: one task scale's gradient alone read 4.2e-5
    relative here, the fp32 reference loop's 1.9e-5, the torch backend's 7.1e-6)."""
    keys = [k for k in grads if "scale" in k and grads[k] is not None]
    out = {k: v for k, v in grads.items() if k not in keys}
    if keys:
        out["scales"] = torch.cat([grads[k].reshape(-1).double() for k in keys])
    return out


def check_against_reference(m, x, xt, dtype):
    outs, grads = outputs_and_grads(m, x, xt, sim)
    up = lambda d: {k: v.double() for k, v in d.items()} if d else None  # noqa: E731
    outs64, grads64 = outputs_and_grads(copy.deepcopy(m).double(), x.double(), up(xt), ref_fn)
    assert grads.keys() == grads64.keys()
    for k in grads:
        assert (grads[k] is None) == (grads64[k] is None), f"{k}: gradient {'missing' if grads[k] is None else 'unexpected'}"
    grads, grads64 = _scales_as_one(grads), _scales_as_one(grads64)
    if dtype == torch.float32:
        for i, (a, b) in enumerate(zip(outs, outs64)):
            assert rel_err(a, b) <= TOL[dtype], f"output {i}: {rel_err(a, b):.3g}"
        for k in grads:
            if grads[k] is not None:
                assert rel_err(grads[k], grads64[k]) <= TOL[dtype], f"grad {k}: {rel_err(grads[k], grads64[k]):.3g}"
        return
    outs_lo, grads_lo = outputs_and_grads(copy.deepcopy(m), x, xt, ref_fn)   # the naive loop in this dtype
    grads_lo = _scales_as_one(grads_lo)
    names = [f"output {j}" for j in range(len(outs))] + list(grads)
    triples = list(zip(outs, outs_lo, outs64)) + [(grads[k], grads_lo[k], grads64[k]) for k in grads]
    for name, (got, loop, exact) in zip(names, triples):
        if got is None:
            continue
        # trainable scales are fp32 parameters whatever the layer's dtype
        rounding = rel_err(exact.to(got.dtype), exact)
        bound = 2 * rel_err(loop, exact) + rounding
        assert rel_err(got, exact) <= bound, (f"{name}: error {rel_err(got, exact):.3g} > 2 x the {dtype} reference's "
                                              f"{rel_err(loop, exact):.3g} + rounding {rounding:.3g}")


@pytest.fixture(params=[("forward", 0), ("reverse", 0), ("shuffle", 3)], ids=lambda p: p[0])
def schedule(lib, request):
    """The order the emulator runs a block's threads in between barriers (race-free kernels: any)."""
    cuda_sim.set_schedule(lib, *request.param)
    yield request.param[0]
    cuda_sim.set_schedule(lib, "forward")


@pytest.mark.parametrize("with_tasks", [False, True], ids=["x_tasks=None", "x_tasks"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cls", [pk.MTLoRALinear, pk.MTLoRAQKV], ids=["Linear", "QKV"])
def test_layer_fp32_matches_fp64_reference(lib, schedule, cls, mode, with_tasks):
    # 18 rows x 21 in -> 19 out (QKV: 3 x 19): ragged tiles, scalar loads (21 * 4 bytes is no 16-byte row)
    before = cuda_sim.stats(lib)
    m = make(mode, cls=cls)
    x, xt = inputs(21, m.tasks, with_tasks, torch.float32)
    check_against_reference(m, x, xt, torch.float32)
    after = cuda_sim.stats(lib)
    # the emulated kernels ran: forward (shrinks + outputs) and dgrad (dG per group and adapter, dX, dX_t)
    # (one launch per group and adapter of rank > 0; addition has no shared adapter: rank 0)
    G, T1 = (3 if cls is pk.MTLoRAQKV else 1), (1 if mode == "lora_only" else 4)
    per_adapter = G * T1 - (G if mode == "addition" else 0)
    shrinks = per_adapter if (with_tasks and mode != "lora_only") else 1
    dg = per_adapter
    dxt = T1 - 1 if (with_tasks and mode != "lora_only") else 0
    assert after["launches"] - before["launches"] == shrinks + 1 + dg + 1 + dxt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cls,mode,with_tasks", [(pk.MTLoRALinear, "matrixv2", True), (pk.MTLoRAQKV, "matrix", False),
                                                 (pk.MTLoRALinear, "lora_only", False)],
                         ids=["Linear-matrixv2-x_tasks", "QKV-matrix", "Linear-lora_only"])
def test_layer_low_precision_within_twice_the_same_dtype_reference(lib, schedule, cls, mode, with_tasks, dtype):
    # K = 24, out = 16: 16-byte rows in both dtypes, so the cp.async path and WMMA both run
    m = make(mode, cls=cls, in_f=24, out_f=16, dtype=dtype)
    x, xt = inputs(24, m.tasks, with_tasks, dtype, shape=(3, 10))
    copies = cuda_sim.stats(lib)["async_copies"]
    check_against_reference(m, x, xt, dtype)
    assert cuda_sim.stats(lib)["async_copies"] > copies, "the 16-byte cp.async path did not run"


def test_unequal_ranks_with_a_rank_zero_task_and_a_single_task(lib):
    # shared rank 7, tasks of rank 1, 3 and 0 (a rank-0 task keeps the base output), 20 > 16 rank columns
    # in one chunk of the output epilogue
    m = make("matrixv2", r={"shared": 20, "seg": 1, "depth": 3, "normals": 0}, in_f=17, out_f=9)
    x, xt = inputs(17, m.tasks, True, torch.float32, shape=(5,))
    check_against_reference(m, x, xt, torch.float32)
    x, _ = inputs(17, m.tasks, False, torch.float32, shape=(5,))
    check_against_reference(m, x, None, torch.float32)
    torch.manual_seed(0)
    m1 = pk.MTLoRALinear(6, 4, r={"shared": 2, "only": 5}, lora_task_scale={"only": 0.7}, tasks=["only"],
                         trainable_scale_per_task=True)
    with torch.no_grad():
        m1.lora_shared_B.normal_()
        m1.lora_tasks_B["only"].normal_()
    x1, _ = inputs(6, ["only"], False, torch.float32, shape=(2, 3))
    check_against_reference(m1, x1, None, torch.float32)


def _op_case(G, with_tasks, dtype=torch.float32, N=70, K=24, Mg=20, ranks=(5, 2, 0, 3)):
    g = torch.Generator().manual_seed(7 * G + with_tasks)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    R = sum(ranks)
    xs = [rnd(N, K) for _ in ranks[1:]] if with_tasks else []
    return (rnd(N, K), xs, rnd(G * Mg, K) / 5, rnd(G * Mg), rnd(G * R, K) / 5, rnd(G * Mg, R), list(ranks),
            torch.rand(G, len(ranks), generator=g) + 0.5, G)


@pytest.mark.parametrize("G,with_tasks,s2t,ranks,layout", [
    (1, True, True, (5, 2, 0, 3), "dense"), (3, False, False, (5, 2, 0, 3), "dense"),
    (3, True, True, (20, 2, 0, 3), "transposed")],
    ids=["G1-x_tasks-v2", "G3-matrix", "G3-x_tasks-v2-R75-transposed"])
def test_ops_are_schedule_independent_and_match_the_torch_backend(lib, G, with_tasks, s2t, ranks, layout):
    """Forward, reverse and shuffled fiber orders give bit-identical results (no race on the shared tiles or
    the output epilogue's chunks), equal to the torch backend's kernels of the same ops (fp64). R = 75
    columns of H: two shrink column tiles, two 16-column chunks of the shared adapter's expand.
    transposed: x, weight, A and B with swapped strides (the scalar load paths)."""
    from palora_kernels.backends.cuda.mtlora import dgrad_inputs
    from palora_kernels.backends.torch import mtlora as tm
    x, xs, w, b, A, B, ranks, s, G = _op_case(G, with_tasks, ranks=ranks)
    if layout == "transposed":
        x, w, A, B = (t.t().contiguous().t() for t in (x, w, A, B))
    dys = [torch.randn(x.shape[0], w.shape[0]) for _ in ranks]
    runs = []
    try:
        for name, seed in (("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2)):
            cuda_sim.set_schedule(lib, name, seed)
            y, h = cuda_sim.mtlora_mm_sim(x, xs, w, b, A, B, ranks, s, G, s2t, lib=lib)
            d, dbase, cs = dgrad_inputs(dys, ranks, s, G, xs, s2t, True, True)
            runs.append((y, h) + cuda_sim.mtlora_mm_dgrad_sim(d, dbase, w, A, B, ranks, cs, G, s2t, True, len(xs), lib=lib))
    finally:
        cuda_sim.set_schedule(lib, "forward")
    for r in runs[1:]:
        assert all(torch.equal(a, b_) for a, b_ in zip(r, runs[0]))
    y, h, dx, dxs, dg = runs[0]
    d64 = lambda t: t.double()  # noqa: E731
    ey, eh = tm.mtlora_mm(d64(x), [d64(t) for t in xs], d64(w), d64(b), d64(A), d64(B), ranks, s.double(), G, s2t,
                          0.0, 0, 0)
    edx, edxs, _, edg = tm.mtlora_mm_dgrad([d64(t) for t in dys], d64(x), [d64(t) for t in xs], d64(w), d64(A), d64(B),
                                           ranks, s.double(), G, s2t, 0.0, 0, 0, True, True)
    for name, a, e in (("Y", y, ey), ("H", h, eh), ("dX", dx, edx), ("dXs", dxs, edxs), ("dG", dg, edg)):
        assert rel_err(a, e) <= TOL[torch.float32], f"{name}: {rel_err(a, e):.3g}"


def test_broken_cp_async_wait_gives_wrong_result(lib):
    """The proof is not vacuous: a build whose cp.async.wait_group do nothing reads the tiles before they land
    (the emulator poisons them with NaN), in the forward and in the data gradient."""
    broken = cuda_sim.build(("PALORA_BREAK_CPASYNC_WAIT",))
    x, xs, w, b, A, B, ranks, s, G = _op_case(1, False)
    good = cuda_sim.mtlora_mm_sim(x, xs, w, b, A, B, ranks, s, G, False, lib=lib)
    bad = cuda_sim.mtlora_mm_sim(x, xs, w, b, A, B, ranks, s, G, False, lib=broken, verify=False)
    assert not torch.equal(bad[0], good[0]) and bad[0].isnan().any()
    from palora_kernels.backends.cuda.mtlora import dgrad_inputs
    dys = [torch.randn(x.shape[0], w.shape[0]) for _ in ranks]
    d, dbase, cs = dgrad_inputs(dys, ranks, s, G, xs, False, True, False)
    ok = cuda_sim.mtlora_mm_dgrad_sim(d, dbase, w, A, B, ranks, cs, G, False, True, 0, lib=lib)
    nok = cuda_sim.mtlora_mm_dgrad_sim(d, dbase, w, A, B, ranks, cs, G, False, True, 0, lib=broken, verify=False)
    assert not torch.equal(nok[0], ok[0]) and nok[0].isnan().any()


def test_broken_barrier_breaks_the_output_epilogue(lib):
    """-DPALORA_BREAK_BARRIER drops the K loop's and the output epilogue's chunk barriers (both at once: it does
    not tell which one broke it): threads then read tiles and chunks other threads have not staged yet
    (NaN-poisoned shared memory) or already overwrote."""
    broken = cuda_sim.build(("PALORA_BREAK_BARRIER",))
    x, xs, w, b, A, B, ranks, s, G = _op_case(3, True, ranks=(20, 2, 0, 3))   # 20: two chunks of 16
    good = cuda_sim.mtlora_mm_sim(x, xs, w, b, A, B, ranks, s, G, True, lib=lib)
    bad = cuda_sim.mtlora_mm_sim(x, xs, w, b, A, B, ranks, s, G, True, lib=broken, verify=False)
    assert not torch.equal(bad[0], good[0])


@pytest.mark.parametrize("cls,mode,with_tasks", [(pk.MTLoRALinear, "matrixv2", False), (pk.MTLoRAQKV, "matrix", True)],
                         ids=["Linear-matrixv2", "QKV-matrix-x_tasks"])
def test_dropout_in_the_kernels_equals_the_explicit_mask(lib, cls, mode, with_tasks):
    """LoRA dropout in the kernels: the mask of palora_kernels._rng (one per q/k/v group, offsets g*N*K)
    drawn in the forward and regenerated in the backward. The layer under cuda_sim equals the reference
    forward with that explicit mask in fp64 (outputs and every gradient) and the torch backend's kernels."""
    from palora_kernels._rng import draw_seed_offset, keep_mask
    p = 0.3
    m = make(mode, cls=cls, dropout=p)
    x, xt = inputs(21, m.tasks, with_tasks, torch.float32)
    G = 3 if cls is pk.MTLoRAQKV else 1
    torch.manual_seed(123)
    seed, offset = draw_seed_offset(G * x.numel())
    masks = [keep_mask(seed, offset + g * x.numel(), x.shape, p).double() for g in range(G)]
    assert 0 < sum(k.sum() for k in masks) < sum(k.numel() for k in masks)

    def fused(backend):
        def fn(m, x, xt):
            torch.manual_seed(123)
            return m(x, xt, backend=backend)
        return fn

    def explicit(m, x, xt):     # the reference forward on x * mask_g / (1 - p), per part for QKV
        parts = [m] if cls is pk.MTLoRALinear else [m.q, m.k, m.v]
        outs = []
        for part, mk in zip(parts, masks):
            pre = torch.nn.functional.linear(x, part.linear.weight, part.linear.bias)
            xd = x * mk / (1 - p)
            shared = (xd @ part.lora_shared_A.t() @ part.lora_shared_B.t()) * part.lora_shared_scale
            tasks = {t: (xd if xt is None else xt[t]) @ part.lora_tasks_A[t].t() @ part.lora_tasks_B[t].t()
                     * part.lora_task_scale[t] for t in part.tasks}
            extra = shared if part.shared_mode == "matrixv2" else 0
            outs.append((pre + shared, {t: pre + extra + v for t, v in tasks.items()}))
        return torch.cat([o[0] for o in outs], -1), {t: torch.cat([o[1][t] for o in outs], -1) for t in TASKS}

    before = cuda_sim.stats(lib)["launches"]
    outs, grads = outputs_and_grads(m, x, xt, fused("cuda_sim"))
    assert cuda_sim.stats(lib)["launches"] > before, "the emulated kernels ran"
    up = lambda d: {k: v.double() for k, v in d.items()} if d else None  # noqa: E731
    outs64, grads64 = outputs_and_grads(copy.deepcopy(m).double(), x.double(), up(xt), explicit)
    for i, (a, b) in enumerate(zip(outs, outs64)):
        assert rel_err(a, b) <= TOL[torch.float32], f"output {i}: {rel_err(a, b):.3g}"
    g1, g2 = _scales_as_one(grads), _scales_as_one(grads64)
    for k in g1:
        if g1[k] is not None:
            assert rel_err(g1[k], g2[k]) <= TOL[torch.float32], f"grad {k}: {rel_err(g1[k], g2[k]):.3g}"
    outs_t, _ = outputs_and_grads(m, x, xt, fused("torch"))
    assert all(rel_err(a, b) <= TOL[torch.float32] for a, b in zip(outs, outs_t))
    m.eval()                    # eval: no dropout, the p = 0 layer
    m0 = copy.deepcopy(m)
    for part in ([m0] if cls is pk.MTLoRALinear else [m0, m0.q, m0.k, m0.v]):
        part.lora_dropout_p = 0.0
    a, b = sim(m, x, xt), sim(m0, x, xt)
    assert torch.equal(a[0], b[0])


def test_errors_name_the_argument(lib):
    x, xs, w, b, A, B, ranks, s, G = _op_case(1, True)
    with pytest.raises(RuntimeError, match=r"mtlora_mm: n_xs: expected 0 or T = 3, got 2"):
        cuda_sim.mtlora_mm_sim(x, xs[:2], w, b, A, B, ranks, s, G, False, lib=lib)
    with pytest.raises(ValueError, match=r"ranks: cuda_sim runs 1 \.\. 32 adapters, got 33"):
        cuda_sim.mtlora_mm_sim(x, [], w, b, A, B, [0] * 33, s, G, False, lib=lib)
    with pytest.raises(TypeError, match=r"A: expected dtype torch.float32"):
        cuda_sim.mtlora_mm_sim(x, xs, w, b, A.double(), B, ranks, s, G, False, lib=lib)


def test_records_declare_the_mtlora_ops():
    from palora_kernels import dispatch
    for name in ("cuda", "cuda_sim"):
        assert {"mtlora_mm", "mtlora_mm_dgrad"} <= set(dispatch.record(name).kernels)
    assert dispatch.select_backend("cpu", "mtlora_mm", torch.float32, "cuda_sim") == "cuda_sim"


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_backend_matches_reference_on_gpu(dtype):
    """The same kernels compiled by nvcc (backend cuda) on a real GPU; never run here (no GPU)."""
    for cls, mode, with_tasks in [(pk.MTLoRAQKV, "matrixv2", True), (pk.MTLoRALinear, "matrix", False)]:
        m = make(mode, cls=cls, in_f=96, out_f=80, dtype=dtype).cuda()
        x, xt = inputs(96, m.tasks, with_tasks, dtype, shape=(3, 70))
        x, xt = x.cuda(), ({k: v.cuda() for k, v in xt.items()} if xt else None)
        outs, grads = outputs_and_grads(m, x, xt, lambda m, x, xt: m(x, xt, backend="cuda"))
        ref, ref_g = outputs_and_grads(m, x, xt, lambda m, x, xt: m(x, xt, backend="torch"))
        tol = TOL[dtype] if dtype == torch.float32 else 4 * TOL[dtype]
        for a, b in list(zip(outs, ref)) + [(grads[k], ref_g[k]) for k in grads if "scale" not in k]:
            assert rel_err(a, b) <= tol
