"""MTLoRALinear / MTLoRAQKV and the palora::mtlora_mm op (docs/mtlora.md) against an fp64 oracle
that re-implements the MTLoRA reference layer's forward (models/lora.py of scale-lab/MTLoRA)
literally: separate matmuls, one (N, out) tensor per output, autograd for the gradients."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from conftest import TOL, rel_err  # noqa: E402
import palora_kernels as pk  # noqa: E402
from palora_kernels import _ops  # noqa: E402

TASKS = ["seg", "depth", "normals"]
pytestmark = pytest.mark.usefixtures("one_thread")     # tiny tensors: a second thread only spins


# ------------------------------------------------------------------------------------------------
# the oracle: the reference forward, written out (x_tasks dict or None), dropout given as a mask
# ------------------------------------------------------------------------------------------------
def _scale(s):
    return s if not isinstance(s, torch.Tensor) else s.to(torch.float64)


def oracle_linear(m, x, x_tasks=None, mask=None, p=0.0, cast=lambda t: t):
    """What the reference MTLoRALinear.forward computes, from m's parameters (run it on an fp64 copy)."""
    W, b = cast(m.linear.weight), (cast(m.linear.bias) if m.linear.bias is not None else None)
    pretrained = torch.nn.functional.linear(x, W, b)
    if m.r == 0:
        return pretrained, None
    xd = x if mask is None else x * mask / (1 - p)
    tasks = m.tasks
    def task_out(t):
        xt = xd if x_tasks is None else x_tasks[t]
        return xt @ cast(m.lora_tasks_A[t]).t() @ cast(m.lora_tasks_B[t]).t() * _scale(m.lora_task_scale[t])
    if m.shared_mode in ("matrix", "matrixv2"):
        lora = (xd @ cast(m.lora_shared_A).t() @ cast(m.lora_shared_B).t()) * _scale(m.lora_shared_scale)
        extra = lora if m.shared_mode == "matrixv2" else 0
        lt = {t: pretrained + extra + task_out(t) for t in tasks} if tasks is not None else None
    else:
        lt = {t: pretrained + task_out(t) for t in tasks}
        lora = torch.nn.functional.layer_norm(torch.stack(list(lt.values())).sum(0), m.lora_norm.normalized_shape,
                                              cast(m.lora_norm.weight), cast(m.lora_norm.bias), m.lora_norm.eps)
    return pretrained + lora, lt


def oracle_qkv(m, x, x_tasks=None, masks=(None, None, None), p=0.0):
    """The reference MTLoRAQKV.forward: [q | k | v] of each output (each part with its own dropout mask)."""
    outs = [oracle_linear(s, x, x_tasks, mk, p) for s, mk in zip((m.q, m.k, m.v), masks)]
    lt = {t: torch.cat([o[1][t] for o in outs], -1) for t in m.tasks} if m.tasks else None
    return torch.cat([o[0] for o in outs], -1), lt


def make(mode="matrix", tasks=TASKS, r=None, in_f=13, out_f=11, trainable=False, bias=True, dtype=torch.float64,
         seed=0, dropout=0.0, cls=pk.MTLoRALinear):
    torch.manual_seed(seed)
    r = r if r is not None else {"shared": 5, **{t: 2 + i for i, t in enumerate(tasks or [])}}
    scales = {t: 0.5 + 0.25 * i for i, t in enumerate(tasks or [])}
    m = cls(in_f, out_f, r=r, lora_shared_scale=1.5, lora_task_scale=scales, lora_dropout=dropout, tasks=tasks,
            trainable_scale_shared=trainable, trainable_scale_per_task=trainable, shared_mode=mode, bias=bias,
            dtype=dtype)
    with torch.no_grad():      # B = 0 at init: give the adapters something to do
        for n, prm in m.named_parameters():
            if "lora_" in n and prm.dim() == 2:
                prm.normal_(0, 0.3)
            if "scale" in n:
                prm.add_(0.1)
    return m


def inputs(m_in, tasks, with_tasks, shape=(3, 7), dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, m_in, generator=g).to(dtype)
    xt = {t: torch.randn(*shape, m_in, generator=g).to(dtype) for t in tasks} if with_tasks and tasks else None
    return x, xt


def _flat(y, lt):
    return [y] + ([lt[t] for t in sorted(lt)] if lt is not None else [])


MODES = ["matrix", "matrixv2", "addition", "lora_only"]
BACKENDS = ["torch", "triton"]


def run_with_grads(m, x, xt, fn, seed=5, grad_dtype=None):
    """fn(m, x, xt) -> (y, {task: y_t}); the outputs and the gradients of x, the task inputs and every
    trainable parameter of m (by name) for a random upstream gradient on every output (rounded to
    grad_dtype first, so an fp64 oracle sees the same upstream gradient as a low-precision run)."""
    x = x.clone().requires_grad_()
    xt = {k: v.clone().requires_grad_() for k, v in xt.items()} if xt else None
    y, lt = fn(m, x, xt)
    outs = _flat(y, lt)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g).to(grad_dtype or o.dtype).to(o.dtype)).sum() for o in outs)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    wrt = [x] + (list(xt.values()) if xt else []) + [p for n, p in m.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = dict(zip(["x"] + [f"x_tasks.{k}" for k in (xt or {})] + names, got))
    return outs, grads


def oracle_fn(m):
    return oracle_linear if isinstance(m, pk.MTLoRALinear) else oracle_qkv


def assert_matches_oracle(m, x, xt, backend, tol):
    outs, grads = run_with_grads(m, x, xt, lambda m, x, xt: m(x, xt, backend=backend))
    m64 = __import__("copy").deepcopy(m).double()
    x64 = x.double()
    xt64 = {k: v.double() for k, v in xt.items()} if xt else None
    outs64, grads64 = run_with_grads(m64, x64, xt64, oracle_fn(m))
    for i, (a, b) in enumerate(zip(outs, outs64)):
        assert rel_err(a, b) <= tol, f"output {i}: {rel_err(a, b):.3g}"
    assert grads.keys() == grads64.keys()
    for k in grads:
        a, b = grads[k], grads64[k]
        assert (a is None) == (b is None), f"{k}: gradient {'missing' if a is None else 'unexpected'}"
        if a is not None:
            # trainable scales are fp32 parameters (as the reference's): their gradient is fp32-rounded
            t = max(tol, TOL[torch.float32]) if "scale" in k else tol
            assert rel_err(a, b) <= t, f"grad {k}: {rel_err(a, b):.3g}"


@pytest.mark.parametrize("with_tasks", [False, True], ids=["x_tasks=None", "x_tasks"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cls", [pk.MTLoRALinear, pk.MTLoRAQKV], ids=["Linear", "QKV"])
def test_torch_backend_matches_reference_fp64(cls, mode, with_tasks):
    for trainable in ((False, True) if cls is pk.MTLoRALinear else (True,)):
        m = make(mode, trainable=trainable, cls=cls)
        x, xt = inputs(13, m.tasks, with_tasks)
        assert_matches_oracle(m, x, xt, "torch", TOL[torch.float64])


# The interpreter runs ~1 s per launch configuration here: three cases cover the in-loop shrink (no task
# inputs, with q/k/v groups), the split shrink (task inputs), and every mode's one-hot scale rows.
@pytest.mark.parametrize("cls,mode,with_tasks", [(pk.MTLoRALinear, "matrixv2", True), (pk.MTLoRAQKV, "matrix", False),
                                                 (pk.MTLoRALinear, "addition", False)],
                         ids=["Linear-matrixv2-x_tasks", "QKV-matrix", "Linear-addition"])
def test_triton_interpreter_matches_reference_fp64(cls, mode, with_tasks):
    # 19 x 21 with 2 x 9 rows: ragged last tiles of the interpreter's 16 x 16 x 16 tiles in N, M and K
    m = make(mode, trainable=True, cls=cls, in_f=21, out_f=19)
    x, xt = inputs(21, m.tasks, with_tasks, shape=(2, 9))
    assert_matches_oracle(m, x, xt, "triton", TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_unequal_ranks_one_task_and_rank_zero(backend):
    # shared rank 7, tasks of rank 1, 3 and 0 (a rank-0 task keeps the base output), scales per task
    m = make("matrixv2", r={"shared": 7, "seg": 1, "depth": 3, "normals": 0}, in_f=17, out_f=9)
    x, xt = inputs(17, m.tasks, True, shape=(5,))
    assert_matches_oracle(m, x, xt, backend, TOL[torch.float64])
    m1 = make("matrix", tasks=["only"], r={"shared": 2, "only": 5}, in_f=6, out_f=4)
    x1, xt1 = inputs(6, m1.tasks, False, shape=(2, 3))
    assert_matches_oracle(m1, x1, xt1, backend, TOL[torch.float64])


def test_non_contiguous_inputs_and_no_bias():
    m = make("matrix", bias=False, in_f=8, out_f=6)
    x = torch.randn(8, 10, dtype=torch.float64).t()[:, None, :]            # (10, 1, 8), stride 1 on dim 0
    xt = {t: torch.randn(8, 10, dtype=torch.float64).t()[:, None, :] for t in m.tasks}
    assert_matches_oracle(m, x, xt, "torch", TOL[torch.float64])


def test_r_zero_is_the_plain_linear():
    m = pk.MTLoRALinear(5, 4, r=0, tasks=TASKS, lora_task_scale=1.0)
    x = torch.randn(3, 5)
    y, lt = m(x)
    assert lt is None and torch.equal(y, m.linear(x))
    assert set(m.state_dict()) == {"linear.weight", "linear.bias"}


# ------------------------------------------------------------------------------------------------
# checkpoints and initialisation: the reference's names and draw order
# ------------------------------------------------------------------------------------------------
def reference_keys(tasks, mode, trainable_shared, trainable_task, bias=True, prefix=""):
    """The state_dict keys of the reference MTLoRALinear, from its attribute names (models/lora.py)."""
    keys = {prefix + "linear.weight"} | ({prefix + "linear.bias"} if bias else set())
    if mode == "lora_only" or tasks is None:
        tasks, mode = None, "matrix"
    for t in tasks or []:
        keys |= {f"{prefix}lora_tasks_A.{t}", f"{prefix}lora_tasks_B.{t}"}
        if trainable_task:
            keys.add(f"{prefix}lora_task_scale.{t}")
    if mode in ("addition", "add"):
        keys |= {prefix + "lora_norm.weight", prefix + "lora_norm.bias"}
    else:
        keys |= {prefix + "lora_shared_A", prefix + "lora_shared_B"}
    if trainable_shared:
        keys.add(prefix + "lora_shared_scale")
    return keys


@pytest.mark.parametrize("mode", ["matrix", "matrixv2", "add", "lora_only"])
@pytest.mark.parametrize("trainable", [False, True])
def test_state_dict_of_the_reference_loads_strict(mode, trainable):
    r = {"shared": 4, "seg": 2, "depth": 3, "normals": 1}
    keys = reference_keys(TASKS, mode, trainable, trainable)
    m = pk.MTLoRALinear(9, 7, r=r, lora_task_scale={t: 1.0 for t in TASKS}, tasks=TASKS, shared_mode=mode,
                        trainable_scale_shared=trainable, trainable_scale_per_task=trainable)
    assert set(m.state_dict()) == keys
    # a checkpoint with the reference's keys and shapes (random values) loads strict and is what runs
    shapes = {"linear.weight": (7, 9), "linear.bias": (7,), "lora_shared_A": (4, 9), "lora_shared_B": (7, 4),
              "lora_norm.weight": (7,), "lora_norm.bias": (7,), "lora_shared_scale": (1,)}
    for t in TASKS:
        shapes.update({f"lora_tasks_A.{t}": (r[t], 9), f"lora_tasks_B.{t}": (7, r[t]), f"lora_task_scale.{t}": (1,)})
    sd = {k: torch.randn(shapes[k]) for k in keys}
    m.load_state_dict(sd, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    qkv = pk.MTLoRAQKV(9, 7, r=r, lora_task_scale=1.0, tasks=TASKS, shared_mode=mode,
                       trainable_scale_shared=trainable, trainable_scale_per_task=trainable)
    assert set(qkv.state_dict()) == set().union(*[reference_keys(TASKS, mode, trainable, trainable, prefix=p + ".")
                                                   for p in "qkv"])


def test_init_draws_as_the_reference():
    """Same seed -> the same numbers: nn.Linear, then the shared A, then each task's A (kaiming a=sqrt(5))."""
    r = {"shared": 3, "seg": 2, "depth": 4, "normals": 1}
    torch.manual_seed(7)
    lin = nn.Linear(10, 6)
    want = {"linear.weight": lin.weight.detach().clone(), "linear.bias": lin.bias.detach().clone()}
    for name, shape in [("lora_shared_A", (3, 10))] + [(f"lora_tasks_A.{t}", (r[t], 10)) for t in TASKS]:
        w = torch.zeros(shape)
        nn.init.kaiming_uniform_(w, a=5 ** 0.5)
        want[name] = w
    torch.manual_seed(7)
    m = pk.MTLoRALinear(10, 6, r=r, lora_task_scale={t: 1.0 for t in TASKS}, tasks=TASKS)
    sd = m.state_dict()
    for k, v in want.items():
        assert torch.equal(sd[k], v), k
    assert all(not sd[k].any() for k in sd if "_B" in k), "B must start at zero"
    y, lt = m(torch.randn(2, 10))
    assert all(torch.equal(v, y) for v in lt.values()), "a fresh layer: every output is the base output"


# ------------------------------------------------------------------------------------------------
# merge / unmerge, frozen base
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["matrix", "matrixv2", "addition"])
def test_merge_each_output_and_unmerge_exactly(mode):
    m = make(mode, trainable=True)
    x, _ = inputs(13, m.tasks, False)
    w0 = m.linear.weight.detach().clone()
    y, lt = m(x)
    for out in (["shared"] if mode != "addition" else []) + TASKS:
        m.merge(out)
        ym, none = m(x)
        assert none is None
        assert rel_err(ym, y if out == "shared" else lt[out]) <= TOL[torch.float64]
        assert torch.equal(m.state_dict()["linear.weight"], w0), "a merged layer saves the unmerged weight"
        with pytest.raises(ValueError, match="x_tasks"):
            m(x, {t: x for t in TASKS})
        m.unmerge()
        assert torch.equal(m.linear.weight, w0)
    if mode == "addition":
        with pytest.raises(ValueError, match="LayerNorm"):
            m.merge("shared")
        assert torch.equal(m.linear.weight, w0) and not m.merged
    with pytest.raises(ValueError, match="output"):
        m.merge("nope")


def test_qkv_merge():
    m = make("matrix", cls=pk.MTLoRAQKV)
    x, _ = inputs(13, m.tasks, False)
    y, lt = m(x)
    m.merge("depth")
    assert rel_err(m(x)[0], lt["depth"]) <= TOL[torch.float64]
    m.unmerge()
    assert rel_err(m(x)[0], y) == 0


def test_frozen_base_computes_no_weight_gradient(monkeypatch):
    from palora_kernels import dispatch
    from palora_kernels.backends.torch import mtlora as tm
    seen = []
    real = tm.mtlora_mm_dgrad

    def spy(*args):
        seen.append(args[-1])     # need_base
        return real(*args)
    monkeypatch.setattr(tm, "mtlora_mm_dgrad", spy)
    dispatch.clear_cache()
    try:
        m = make("matrix")
        m.linear.requires_grad_(False)          # MTLoRA's FREEZE_PRETRAINED
        x, xt = inputs(13, m.tasks, True)
        assert_matches_oracle(m, x, xt, "torch", TOL[torch.float64])
        assert seen and not any(seen), "a frozen base must not ask for dBase (dW, db)"
        assert m.linear.weight.grad is None
    finally:
        dispatch.clear_cache()


# ------------------------------------------------------------------------------------------------
# LoRA dropout: a counter-based mask on the adapters' input x, regenerated in the backward
# ------------------------------------------------------------------------------------------------
def _masks(m, x, p, seed_torch):
    """The masks the layer draws under torch.manual_seed(seed_torch): one per q/k/v group."""
    from palora_kernels._rng import draw_seed_offset, keep_mask
    G = 3 if isinstance(m, pk.MTLoRAQKV) else 1
    torch.manual_seed(seed_torch)
    seed, offset = draw_seed_offset(G * x.numel())
    return [keep_mask(seed, offset + g * x.numel(), x.shape, p).to(torch.float64) for g in range(G)]


@pytest.mark.parametrize("cls,mode,with_tasks,backend", [
    (pk.MTLoRALinear, "matrix", False, "torch"), (pk.MTLoRALinear, "addition", False, "torch"),
    (pk.MTLoRAQKV, "matrixv2", True, "torch"),
    (pk.MTLoRALinear, "matrixv2", True, "triton"), (pk.MTLoRAQKV, "matrix", False, "triton")],
    ids=["Linear-matrix-torch", "Linear-addition-torch", "QKV-matrixv2-x_tasks-torch", "Linear-matrixv2-x_tasks-triton",
         "QKV-matrix-triton"])
def test_dropout_equals_explicit_mask_composition(cls, mode, with_tasks, backend):
    p = 0.3
    m = make(mode, cls=cls, dropout=p, trainable=True, in_f=21, out_f=11)
    x, xt = inputs(21, m.tasks, with_tasks, shape=(2, 9))
    masks = _masks(m, x, p, 123)      # in-kernel tl.rand (triton) and _rng (torch) must both give these
    assert 0 < sum(k.sum() for k in masks) < sum(k.numel() for k in masks)

    def fused(m, x, xt):
        torch.manual_seed(123)
        return m(x, xt, backend=backend)

    def explicit(m, x, xt):
        if isinstance(m, pk.MTLoRALinear):
            return oracle_linear(m, x, xt, masks[0], p)
        return oracle_qkv(m, x, xt, masks, p)
    outs, grads = run_with_grads(m, x, xt, fused)
    m64 = __import__("copy").deepcopy(m).double()
    outs64, grads64 = run_with_grads(m64, x.double(), xt, explicit)
    for a, b in zip(outs, outs64):
        assert rel_err(a, b) <= TOL[torch.float64]
    for k in grads:          # the backward regenerated the forward's mask: same gradients as the explicit mask
        if grads[k] is not None:
            t = TOL[torch.float32] if "scale" in k else TOL[torch.float64]
            assert rel_err(grads[k], grads64[k]) <= t, k
    # eval mode: no dropout, the p = 0 layer
    m.eval()
    m0 = __import__("copy").deepcopy(m)
    m0.lora_dropout_p = 0.0
    for sub in ([m0.q, m0.k, m0.v] if isinstance(m0, pk.MTLoRAQKV) else []):
        sub.lora_dropout_p = 0.0
    m0.train()
    for a, b in zip(_flat(*m(x, xt, backend=backend)), _flat(*m0(x, xt, backend=backend))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("cls,with_tasks", [(pk.MTLoRAQKV, False), (pk.MTLoRALinear, True)], ids=["QKV", "Linear-x_tasks"])
def test_frozen_base_dx_in_row_chunks_matches_the_oracle(monkeypatch, cls, with_tasks, p):
    """A frozen base: dX = (sum_o dY_o) W is formed a few rows at a time (no (N, out) sum; 5-row chunks over 18
    rows here, the last one ragged) and dH never exists (dA, dX scale the (R, K) factors): fp64 oracle with the
    explicit dropout mask, and the chunk path really ran."""
    from palora_kernels import dispatch
    from palora_kernels.backends.torch import mtlora as tm
    G, out_f = (3, 11) if cls is pk.MTLoRAQKV else (1, 11)
    monkeypatch.setattr(tm, "DX_CHUNK_BYTES", 5 * G * out_f * 8)
    chunks = []
    real = tm._sum_rows
    monkeypatch.setattr(tm, "_sum_rows", lambda dys, n0, n1, out: chunks.append((n0, n1)) or real(dys, n0, n1, out))
    dispatch.clear_cache()
    try:
        m = make("matrix", cls=cls, dropout=p, in_f=21, out_f=out_f)
        m.requires_grad_(True)
        for lin in ([m.q, m.k, m.v] if cls is pk.MTLoRAQKV else [m]):
            lin.linear.requires_grad_(False)
        x, xt = inputs(21, m.tasks, with_tasks, shape=(2, 9))
        masks = _masks(m, x, p, 7) if p else [None] * G

        def fused(m, x, xt):
            torch.manual_seed(7)
            return m(x, xt, backend="torch")

        def explicit(m, x, xt):
            if cls is pk.MTLoRALinear:
                return oracle_linear(m, x, xt, masks[0], p)
            return oracle_qkv(m, x, xt, masks, p)
        outs, grads = run_with_grads(m, x, xt, fused)
        outs64, grads64 = run_with_grads(__import__("copy").deepcopy(m).double(), x.double(), xt, explicit)
    finally:
        dispatch.clear_cache()
    assert chunks == [(0, 5), (5, 10), (10, 15), (15, 18)]
    assert "linear.weight" not in grads and "q.linear.weight" not in grads
    for a, b in zip(outs, outs64):
        assert rel_err(a, b) <= TOL[torch.float64]
    for k in grads:
        assert rel_err(grads[k], grads64[k]) <= TOL[torch.float64], k


def test_layer_dropout_same_bits_with_and_without_the_cpp_mask(monkeypatch):
    """The fused layer under dropout (forward, dX, dA regenerate the mask) gives the same bits whether _rng
    draws the mask with the C++ op or with its int64 torch arithmetic."""
    import palora_kernels._ext  # noqa: F401
    from palora_kernels import _rng
    if not hasattr(torch.ops.palora, "philox_dropout"):
        pytest.skip("palora_kernels._C is not built (or predates palora::philox_dropout)")
    m = make("matrix", cls=pk.MTLoRAQKV, dropout=0.3, in_f=21, out_f=11, dtype=torch.float32)
    x, _ = inputs(21, m.tasks, False, shape=(2, 9), dtype=torch.float32)
    got = []
    for use in (True, False):
        monkeypatch.setattr(_rng, "USE_CPP", use)
        outs, grads = run_with_grads(m, x, None, lambda m, x, xt: (torch.manual_seed(3), m(x, backend="torch"))[1])
        got.append(outs + [grads[k] for k in sorted(grads)])
    assert all(torch.equal(a, b) for a, b in zip(*got))


def test_dropout_is_deterministic_under_manual_seed_and_varies_without():
    m = make("matrix", dropout=0.5)
    x, _ = inputs(13, m.tasks, False)
    torch.manual_seed(0)
    a = m(x)[0]
    torch.manual_seed(0)
    b = m(x)[0]
    c = m(x)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# fp16 / bf16: within 2x the error of the reference composition run in that dtype (docs/testing.md)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_within_twice_the_same_dtype_reference(dt, backend):
    import copy
    cases = [(pk.MTLoRALinear, "matrixv2", True), (pk.MTLoRAQKV, "matrix", False)]
    if backend == "triton":     # interpreter time: one layer per dtype (both paths over the two dtypes)
        cases = cases[:1] if dt == torch.float16 else cases[1:]
    for i, (cls, mode, with_tasks) in enumerate(cases):
        # trainable scales: ds sums N*r cancelling products (recomputed in fp32; ops/mtlora.py _scale_grad)
        m = make(mode, cls=cls, in_f=24, out_f=20, dtype=torch.float32, seed=i, trainable=True).to(dt)
        x, xt = inputs(24, m.tasks, with_tasks, shape=(3, 10), dtype=torch.float32, seed=i)
        x, xt = x.to(dt), ({k: v.to(dt) for k, v in xt.items()} if xt else None)
        outs, grads = run_with_grads(m, x, xt, lambda m, x, xt: m(x, xt, backend=backend))
        outs_lo, grads_lo = run_with_grads(copy.deepcopy(m), x, xt, oracle_fn(m))
        up = lambda d: {k: v.double() for k, v in d.items()} if d else None  # noqa: E731
        # the oracle gets the same (rounded) upstream gradient: exact math on the same inputs
        outs64, grads64 = run_with_grads(copy.deepcopy(m).double(), x.double(), up(xt), oracle_fn(m), grad_dtype=dt)
        pairs = list(zip(outs, outs_lo, outs64)) + [(grads[k], grads_lo[k], grads64[k]) for k in grads]
        names = [f"output {j}" for j in range(len(outs))] + list(grads)
        for name, (got, loop, exact) in zip(names, pairs):
            bound = 2 * rel_err(loop, exact) + rel_err(exact.to(dt), exact)
            err = rel_err(got, exact)
            assert err <= bound, f"{cls.__name__} {name}: error {err:.3g} > 2 x reference's {rel_err(loop, exact):.3g} + rounding"


# ------------------------------------------------------------------------------------------------
# the custom ops: opcheck, the contract's errors; the layer's errors
# ------------------------------------------------------------------------------------------------
def _op_args(G=1, with_tasks=False, bias=True, backend="torch"):
    g = torch.Generator().manual_seed(G)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    N, K, Mg, ranks = 7, 10, 6, [3, 2, 1]
    R = sum(ranks)
    xs = [rnd(N, K) for _ in ranks[1:]] if with_tasks else []
    return (rnd(N, K), xs, rnd(G * Mg, K), rnd(G * Mg) if bias else None, rnd(G * R, K), rnd(G * Mg, R), ranks,
            rnd(G, len(ranks)), G, True, 0.0, 0, 0, backend)


@pytest.mark.parametrize("G,with_tasks", [(1, False), (3, True)])
def test_opcheck_mtlora_ops(G, with_tasks):
    from torch.library import opcheck
    args = _op_args(G, with_tasks)
    opcheck(torch.ops.palora.mtlora_mm.default, args)
    x, xs, w, b, A, B, ranks, s, G, s2t, p, seed, off, be = args
    y, h = torch.ops.palora.mtlora_mm(*args)
    dys = list(torch.randn_like(y).unbind(0))
    opcheck(torch.ops.palora.mtlora_mm_dgrad.default, (dys, x, xs, w, A, B, ranks, s, G, s2t, p, seed, off, True, True, be))
    assert y.shape == (len(ranks), 7, w.shape[0]) and y.is_contiguous() and h.stride() == (-(-G * 6 // 16) * 16, 1)
    # and the op computes what its docstring says, written out per (output, group, adapter)
    offs, R, Mg = [0, 3, 5, 6], 6, w.shape[0] // G
    for o in range(3):
        for g in range(G):
            want = x @ w[g * Mg:(g + 1) * Mg].t() + b[g * Mg:(g + 1) * Mg]
            for a in ((0,) if o == 0 else (0, o)):      # shared_to_tasks=True
                xa = xs[a - 1] if (a and xs) else x
                want = want + s[g, a] * (xa @ A[g * R + offs[a]:g * R + offs[a + 1]].t()) @ B[g * Mg:(g + 1) * Mg,
                                                                                           offs[a]:offs[a + 1]].t()
            assert_close = rel_err(y[o][:, g * Mg:(g + 1) * Mg], want)
            assert assert_close <= TOL[torch.float32], (o, g, assert_close)


def test_op_contract_errors_name_the_argument():
    x, xs, w, b, A, B, ranks, s, G, s2t, p, seed, off, be = _op_args()
    for bad, match in (((x, xs, w, b, A[:5], B, ranks, s, G, s2t, p, seed, off, be), r"A: expected \(6, 10\)"),
                       ((x, xs, w, b, A, B[:, :5], ranks, s, G, s2t, p, seed, off, be), r"B: expected \(6, 6\)"),
                       ((x, [x], w, b, A, B, ranks, s, G, s2t, p, seed, off, be), r"xs: expected 0 or T = 2"),
                       ((x, xs, w, b, A, B, ranks, s[:, :2], G, s2t, p, seed, off, be), r"scales: expected a float \(1, 3\)"),
                       ((x, xs, w, b, A, B, ranks, s, G, s2t, 1.0, seed, off, be), r"p: expected dropout probability"),
                       ((x, xs, w.double(), b, A, B, ranks, s, G, s2t, p, seed, off, be), r"weight: expected dtype")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.palora.mtlora_mm(*bad)


def test_layer_errors_name_the_argument_and_change_nothing():
    with pytest.raises(ValueError, match="shared_mode: expected one of"):
        pk.MTLoRALinear(4, 3, r=2, tasks=TASKS, shared_mode="sum")
    with pytest.raises(ValueError, match=r"r: expected a value for every task, missing \['normals'\]"):
        pk.MTLoRALinear(4, 3, r={"shared": 2, "seg": 1, "depth": 1}, tasks=TASKS)
    m = make("matrix")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, xt = inputs(13, m.tasks, True)
    with pytest.raises(ValueError, match=r"x_tasks: expected an input for every task .* missing \['normals'\]"):
        m(x, {t: xt[t] for t in TASKS[:2]})
    with pytest.raises(ValueError, match=r"x_tasks\[1\]: expected a tensor of x's shape"):
        m(x, {**xt, "depth": xt["depth"][:, :3]})
    with pytest.raises(ValueError, match=r"x: expected x.shape\[-1\] = 13"):
        m(x[..., :5])
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge("seg")
        m.merge("depth")
    m.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


# ------------------------------------------------------------------------------------------------
# convert_mtlora: TA-LoRA on the targets, TS-LoRA in the last block of each stage (the reference's)
# ------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


def _swin_like():
    torch.manual_seed(0)
    m = nn.Module()
    m.layers = nn.ModuleList()
    for d, depth in ((8, 2), (16, 2)):
        stage = nn.Module()
        stage.blocks = nn.ModuleList([_Block(d) for _ in range(depth)])
        m.layers.append(stage)
    m.head = nn.Linear(16, 4)
    return m


def test_convert_mtlora_places_adapters_as_the_reference():
    model = _swin_like()
    plain = __import__("copy").deepcopy(model)
    pk.convert_mtlora(model, TASKS, {"shared": 4, **{t: 2 for t in TASKS}}, lora_task_scale=0.5,
                      target_modules=["qkv", "proj", "fc1", "fc2"])
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, pk.MTLoRALinear)
    for name, mod in plain.named_modules():
        if type(mod) is not nn.Linear or name == "head":
            continue
        new = model.get_submodule(name)
        assert isinstance(new, pk.MTLoRALinear), name
        last_block = name.split(".")[3] == "1"
        want_tasks = TASKS if (last_block and not name.endswith("qkv")) else None
        assert new.tasks == want_tasks, name
        assert torch.equal(new.linear.weight, mod.weight) and not new.linear.weight.requires_grad
        x = torch.randn(3, mod.in_features)
        y, lt = new(x)                      # B = 0 at init: every output is the pretrained layer's
        assert torch.allclose(y, mod(x), atol=1e-6) and (lt is None) == (want_tasks is None)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers.0.blocks.1.attn.proj \(nn.Linear\): r: expected a value"):
        pk.convert_mtlora(plain, TASKS, {"shared": 4, "seg": 2}, target_modules=["qkv", "proj"])
    assert all(type(plain.get_submodule(n)) is nn.Linear for n in ("layers.0.blocks.0.attn.qkv",))
    assert plain.state_dict().keys() == before.keys()


def test_reference_composition_of_the_benchmarks_is_the_oracle():
    """palora_kernels.reference.mtlora_* (the benchmarks' 'reference' provider) computes the oracle."""
    from palora_kernels import reference
    for cls, mode, with_tasks in [(pk.MTLoRALinear, "matrixv2", True), (pk.MTLoRALinear, "addition", False),
                                  (pk.MTLoRAQKV, "matrix", False)]:
        m = make(mode, cls=cls, trainable=True)
        x, xt = inputs(13, m.tasks, with_tasks)
        got = reference.mtlora_linear(m, x, xt) if cls is pk.MTLoRALinear else reference.mtlora_qkv(m, x, xt)
        once = reference.mtlora_qkv(m, x, xt, once=True) if cls is pk.MTLoRAQKV else got
        want = oracle_fn(m)(m, x, xt)
        for a, b, c in zip(_flat(*got), _flat(*once), _flat(*want)):
            assert rel_err(a, c) <= TOL[torch.float64] and rel_err(b, c) <= TOL[torch.float64]


def test_reference_composition_draws_a_dropout_mask_per_call_as_the_reference():
    """With lora_dropout > 0 in training, the benchmarks' reference runs nn.Dropout on the adapters' input in
    every sub-layer call, as MTLoRA's models/lora.py: MTLoRAQKV as written calls q, k, v 1 + T times, so 3(1+T)
    fresh masks; once=True draws 3. Each output is the oracle's for the mask its call drew."""
    from palora_kernels import reference
    p = 0.3
    m = make("matrix", cls=pk.MTLoRAQKV, dropout=p)
    x, _ = inputs(13, m.tasks, False)
    for once in (False, True):
        calls = []
        for part in (m.q, m.k, m.v):
            assert isinstance(part.lora_dropout, nn.Dropout) and part.lora_dropout.p == p
            part._hook = part.lora_dropout.register_forward_hook(lambda mod, i, out, part=part: calls.append((part, out)))
        y, lt = reference.mtlora_qkv(m, x, once=once)
        for part in (m.q, m.k, m.v):
            part._hook.remove()
        assert len(calls) == 3 * (1 if once else 1 + len(m.tasks))
        masks = [(part, (out != 0).double()) for part, out in calls]
        assert len({tuple(mk.flatten().tolist()) for _, mk in masks}) == len(masks), "every call draws its own mask"
        per_call = [oracle_linear(part, x, None, mk, p) for part, mk in masks]
        want_y = torch.cat([o[0] for o in per_call[:3]], -1)
        assert rel_err(y, want_y) <= TOL[torch.float64]
        for i, t in enumerate(m.tasks):
            src = per_call[:3] if once else per_call[3 * (1 + i):3 * (2 + i)]
            assert rel_err(lt[t], torch.cat([o[1][t] for o in src], -1)) <= TOL[torch.float64], t


def test_double_backward_matches_the_oracle():
    """create_graph=True differentiates the composition: a gradient penalty's second derivatives are exact."""
    import copy
    m = make("matrixv2", trainable=True, in_f=7, out_f=5)
    x, xt = inputs(7, m.tasks, True, shape=(4,))

    def penalty(mod, fn):
        xx = x.clone().requires_grad_()
        xts = {k: v.clone().requires_grad_() for k, v in xt.items()}
        y, lt = fn(mod, xx, xts)
        w = torch.Generator().manual_seed(3)
        loss = sum((o * torch.randn(o.shape, generator=w, dtype=o.dtype)).sum() for o in _flat(y, lt))
        gx, = torch.autograd.grad(loss, [xx], create_graph=True)
        params = [p for p in mod.parameters() if p.requires_grad]
        return torch.autograd.grad(gx.pow(2).sum(), params + [xts["seg"]], allow_unused=True)
    got = penalty(m, lambda mod, a, b: mod(a, b, backend="torch"))
    want = penalty(copy.deepcopy(m).double(), oracle_linear)
    params = [p for p in m.parameters() if p.requires_grad] + [x]
    assert len(got) == len(want)
    for a, b, p in zip(got, want, params):    # None (unused) and zeros are the same derivative
        a = torch.zeros_like(p, dtype=torch.float64) if a is None else a
        b = torch.zeros_like(p, dtype=torch.float64) if b is None else b
        assert (a - b).abs().max() <= TOL[torch.float32] * max(b.abs().max(), 1e-30) or rel_err(a, b) <= 1e-10
