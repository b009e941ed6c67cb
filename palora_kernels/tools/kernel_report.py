"""Compile every kernel with every shipped config for sm_80 and sm_90, ahead of time (no GPU needed).

    python -m palora_kernels.tools.kernel_report

For each (kernel, config, arch) it reads the registers and spill bytes from the ptxas log, the
shared memory from the compiled kernel's metadata, and looks for tensor-core instructions
(sm_80: mma.sync / HMMA, sm_90: wgmma / HGMMA) in the PTX and the SASS (cuobjdump from the triton
wheel). Prints one table and exits 1 if any config fails to compile, spills, exceeds the shared
memory of its arch, or (a bf16 or TF32 kernel) runs without tensor cores. IEEE fp32 and fp64 run on
FMA units by design: their rows say so and are not failures for it.
The TMA variant of lora_mm (rows "lora_mm[tma, ...]": every bf16 / TF32 lora_mm launch set with
TMA=True, sm_90 only, with the sm_90 configs including the TMA-only ones) must also show a TMA tile
load: cp.async.bulk.tensor in the PTX and UTMALDG in the SASS.
Rows of palora_kernels.tools.cuda_report.cuda_rows() (the CUDA C++ kernels), if that module
exists, are checked and printed the same way, and must also show LDGSTS (cp.async), LDSM (ldmatrix,
16-bit kernels) and no 64-bit integer division in their SASS.

Compiled for bf16 (the tensor-core configs; fp16 tiles are the same size), TF32 (fp32 when torch
allows TF32 matmuls), IEEE fp32 and fp64, for a 4096 x 4096 layer with T=3 tasks of rank 8 (R=24 ->
BLOCK_R=32), with the arguments the launcher really passes in the forward (with and without bias)
and in dX, per-batch and per-sample: the launcher's own argument functions build them on meta
tensors, and Triton's own specialisation turns them into the signature (an int equal to 1 becomes
a constant, one divisible by 16 gets the hint; R = 24 and T = 3 do not).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time

SMEM_LIMIT = {"sm_80": 166912, "sm_90": 232448}   # max dynamic smem per block (A100 163 KB, H100 227 KB)
ARCHS = {"sm_80": 80, "sm_90": 90}
TC = {"sm_80": ("mma.sync.aligned", "HMMA"), "sm_90": ("wgmma.mma_async", "HGMMA")}
TMA_OPS = ("cp.async.bulk.tensor", "UTMALDG")    # TMA tile load: PTX, SASS (sm_90)
KEYS = ("kernel", "config", "arch", "registers", "spills", "smem", "tensor_core", "tma", "ldgsts", "ldsm", "div64")


# one per MMA class: tensor cores (bf16; fp16 tiles are the same size), TF32 tensor cores (fp32 with
# torch.set_float32_matmul_precision("high")), IEEE fp32 FMA, fp64 FMA
DTYPES = ("bf16", "tf32", "fp32", "fp64")
# the launch the report compiles: a LLaMA-7B q/k/v/o projection, T=3 tasks of rank 8 (R=24)
SHAPE = dict(N=4096, K=4096, M=4096, T=3, r=8)


def _launch_sets(dt):
    """The stride sets the Function really launches, as {name: (mm_args, shrink_args, merge_args)}:
    'fwd' (x, W^T, A_cat^T, B_cat^T) with and without bias, and 'dX' (dY, W, B_cat, A_cat), for both
    preference kinds. Built by the launcher's own argument functions on meta tensors."""
    import torch

    from .._math import stack_A, stack_B
    from ..backends.triton import RECORD
    from ..backends.triton import linear as L
    tdt = {"bf16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32, "fp64": torch.float64}[dt]
    N, K, M, T, r = (SHAPE[k] for k in ("N", "K", "M", "T", "r"))
    R = T * r
    meta = dict(device="meta", dtype=tdt)
    pdt = torch.float64 if dt == "fp64" else torch.float32
    W, b = torch.empty(M, K, **meta), torch.empty(M, **meta)
    A_cat = stack_A(torch.empty(T, r, K, **meta))
    B_cat = stack_B(torch.empty(T, M, r, **meta))

    def h_buf(rows):
        return torch.empty_strided((rows, R), (RECORD.h_row_stride(R), 1), **meta)

    out = {}
    for pref in ("batch", "sample"):
        P, Ls = (1, N) if pref == "batch" else (N // 8, 8)        # per-sample: 8 tokens per sample
        ps = torch.empty(P, T, device="meta", dtype=pdt)
        x, dy = torch.empty(N, K, **meta), torch.empty(N, M, **meta)
        fwd = (x, W.t(), A_cat.t(), B_cat.t(), torch.empty(N, M, **meta), h_buf(N))
        dX = (dy, W, B_cat, A_cat, torch.empty(N, K, **meta), h_buf(N))
        for name, (xx, w, down, up, o, h), bias in (("fwd", fwd, b), ("fwd no-bias", fwd, None), ("dX", dX, None)):
            out[(name, pref)] = (L.mm_args(xx, w, bias, down, up, ps, o, h, Ls), L.shrink_args(xx, down, h),
                                 L.merge_args(w, down, up, ps, torch.empty(w.shape, **meta), T))
    return out


def _variants():
    """(name, jit fn, constexprs, launch args, configs(arch family)) of every shipped kernel x dtype x
    launched stride set."""
    import triton.language as tl

    from ..backends.triton import linear as L
    out = []
    for dt in DTYPES:
        mma = L.mma_class("fp32" if dt == "tf32" else dt, "tf32" if dt == "tf32" else "ieee")
        common = dict(UPCAST=False, ACC_DTYPE=tl.float64 if dt == "fp64" else tl.float32,
                      INPUT_PRECISION="tf32" if dt == "tf32" else "ieee", BLOCK_R=L.block_r(24), _dtype=dt)
        mm_cfgs = lambda f, m=mma: L.configs_for(f, m)  # noqa: E731
        sets = _launch_sets(dt)
        for (sname, pref), (mm, shrink, merge) in sets.items():
            for path in ("inloop", "split"):
                c = dict(common, HAS_BIAS=mm["bias_ptr"] is not mm["x_ptr"], PER_SAMPLE_PREF=pref == "sample",
                         SHRINK_IN_LOOP=path == "inloop", EXPAND=True)
                out.append((f"lora_mm[{path}, {sname}, per-{pref} p] {dt}", L._lora_mm_kernel.fn, c, mm, mm_cfgs))
            if pref == "batch" and dt != "bf16" and sname != "dX":    # merged: fp32/fp64, per-batch, forward
                c = dict(common, HAS_BIAS=mm["bias_ptr"] is not mm["x_ptr"], PER_SAMPLE_PREF=False,
                         SHRINK_IN_LOOP=False, EXPAND=False)
                out.append((f"lora_mm[merged GEMM, {sname}] {dt}", L._lora_mm_kernel.fn, c, mm, mm_cfgs))
                if sname == "fwd":
                    t = L.MERGE_TILE[mma]
                    merge_cfg = {"kwargs": {"BLOCK_K": t["BLOCK_K"], "BLOCK_N": t["BLOCK_N"]},
                                 "num_warps": t["num_warps"], "num_stages": 2}
                    out.append((f"lora_merge {dt}", L._lora_merge_kernel, dict(common), merge,
                                lambda f, c=merge_cfg: [c]))
            if pref == "batch" and sname != "fwd no-bias":
                out.append((f"lora_shrink[{sname}] {dt}", L._lora_shrink_kernel.fn, dict(common), shrink,
                            lambda f, m=mma: L.skinny_configs_for(f, m)))
        if dt == "bf16":    # the in-loop limit R = 64: the most registers
            mm = sets[("fwd", "sample")][0]
            c = dict(common, BLOCK_R=L.block_r(64), HAS_BIAS=True, PER_SAMPLE_PREF=True, SHRINK_IN_LOOP=True,
                     EXPAND=True)
            out.append((f"lora_mm[inloop, fwd, per-sample p, R=64] {dt}", L._lora_mm_kernel.fn, c, mm, mm_cfgs))
    return out + _tma_variants(out) + _conv_variants()


def _tma_variants(variants):
    """The TMA copy of every tensor-core lora_mm variant (bf16, TF32): the launcher takes it on the sm_90
    family when tma_problem() finds nothing in the launched operands (true of every set here), with all
    the sm_90 configs, the TMA-only ones included. Not compiled for sm_80 (no TMA there)."""
    from ..backends.triton import linear as L
    out = []
    for name, fn, const, mm, _ in variants:
        if fn is not L._lora_mm_kernel.fn or const["_dtype"] not in ("bf16", "tf32"):
            continue
        mma = "tf32" if const["_dtype"] == "tf32" else "tc"
        up = mm["up_ptr"] if const["EXPAND"] else None
        why = L.tma_problem(mm["x_ptr"], mm["w_ptr"], mma, up)
        assert why is None, f"{name}: {why}"
        c = dict(const, TMA=True, W_T=mm["w_ptr"].stride(1) != 1, UP_T=up is not None and up.stride(1) != 1)
        out.append((name.replace("lora_mm[", "lora_mm[tma, ", 1), fn, c, mm,
                    lambda f, m=mma: L.configs_for(f, m, tma=True) if f == "sm_90" else []))
    return out


# the conv launches the report compiles: a SegNet layer, 3x3 512->512 on 8 x 32x64, T=3 tasks of rank 8
CONV_SHAPE = dict(N=8, C_in=512, C_out=512, H=32, W=64, k=3, T=3, r=8)


def _conv_launch_sets(dt):
    """The argument sets the conv Function really launches (conv2d.fwd_args, conv2d_bwd.dgrad_args /
    wgrad_args on meta tensors): forward in-loop with bias (channels_last, per-sample), without
    (NCHW, per-batch), the split expand; dG (the 1x1 conv of dY with B_cat^T); dX; dW+dA (H100 splits)."""
    import torch

    from .._math import stack_A, stack_B
    from ..backends.triton import conv2d as C
    from ..backends.triton import conv2d_bwd as CB
    tdt = {"bf16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32, "fp64": torch.float64}[dt]
    N, Ci, Co, H, W, k, T, r = (CONV_SHAPE[n] for n in ("N", "C_in", "C_out", "H", "W", "k", "T", "r"))
    R, geo = T * r, ([1, 1], [1, 1], [1, 1])
    meta = dict(device="meta", dtype=tdt)
    pdt = torch.float64 if dt == "fp64" else torch.float32
    w, b = torch.empty(Co, Ci, k, k, **meta), torch.empty(Co, **meta)
    A, B = stack_A(torch.empty(T, r, Ci, k, k, **meta)), stack_B(torch.empty(T, Co, r, **meta))
    cl = dict(memory_format=torch.channels_last)
    x, x_cl = torch.empty(N, Ci, H, W, **meta), torch.empty(N, Ci, H, W, **meta, **cl)
    y, y_cl = torch.empty(N, Co, H, W, **meta), torch.empty(N, Co, H, W, **meta, **cl)
    h, h_cl = torch.empty(N, R, H, W, **meta), torch.empty(N, R, H, W, **meta, **cl)
    pb, psmp = torch.empty(1, T, device="meta", dtype=pdt), torch.empty(N, T, device="meta", dtype=pdt)
    mma = "tf32" if dt == "tf32" else {"bf16": "tc"}.get(dt, dt)
    t = CB.WGRAD_TILE[mma]
    part_rows = Co + R
    tw, ta, tk, splits, rps = CB.wgrad_plan(N * H * W, Co, R, Ci * k * k, k * k, t, 132)
    part = torch.empty(splits, part_rows, Ci * k * k, device="meta", dtype=pdt)
    return {
        "fwd inloop, bias, per-sample p, NHWC": ("fwd", C.fwd_args(x_cl, w, b, A, B, psmp, y_cl, h_cl, *geo),
                                                 dict(HAS_BIAS=True, PER_SAMPLE_PREF=True, SHRINK_IN_LOOP=True,
                                                      EXPAND=True)),
        "fwd inloop, no-bias, per-batch p, NCHW": ("fwd", C.fwd_args(x, w, None, A, B, pb, y, h, *geo),
                                                   dict(HAS_BIAS=False, PER_SAMPLE_PREF=False, SHRINK_IN_LOOP=True,
                                                        EXPAND=True)),
        "fwd split expand, bias, per-sample p, NCHW": ("fwd", C.fwd_args(x, w, b, A, B, psmp, y, h, *geo),
                                                       dict(HAS_BIAS=True, PER_SAMPLE_PREF=True, SHRINK_IN_LOOP=False,
                                                            EXPAND=True)),
        "dG = B_cat^T dY (1x1), NCHW": ("fwd", C.fwd_args(y, B.t()[:, :, None, None], None, None, None, psmp, h, None,
                                                          [1, 1], [0, 0], [1, 1]),
                                        dict(HAS_BIAS=False, PER_SAMPLE_PREF=True, SHRINK_IN_LOOP=False, EXPAND=False)),
        "dX, per-sample p, NCHW": ("dgrad", CB.dgrad_args(y, w, h, A, psmp, torch.empty(N, Ci, H, W, **meta), *geo),
                                   dict(PER_SAMPLE_PREF=True, HAS_ADAPTER=True)),
        "dW+dA, per-sample p, NCHW": ("wgrad", CB.wgrad_args(x, y, h, psmp, part, [k, k], *geo, Co, rps, tw),
                                      dict(PER_SAMPLE_PREF=True)),
    }


def _conv_variants():
    """The Triton conv kernels: every launch set in bf16 with the tensor-core configs; the fp32 (IEEE
    and TF32) and fp64 configs on the in-loop forward and dW+dA sets, and fp64 dX."""
    import triton.language as tl

    from ..backends.triton import conv2d as C
    from ..backends.triton import conv2d_bwd as CB
    from ..backends.triton import linear as L
    fns = {"fwd": C._conv_fwd_kernel.fn, "dgrad": CB._conv_dgrad_kernel.fn, "wgrad": CB._conv_wgrad_kernel}
    out = []
    for dt in DTYPES:
        mma = L.mma_class("fp32" if dt == "tf32" else dt, "tf32" if dt == "tf32" else "ieee")
        common = dict(UPCAST=False, ACC_DTYPE=tl.float64 if dt == "fp64" else tl.float32,
                      INPUT_PRECISION="tf32" if dt == "tf32" else "ieee", _dtype=dt)
        for name, (kind, args, flags) in _conv_launch_sets(dt).items():
            # fp32 (IEEE, TF32), fp64: the in-loop forward, dX in fp64 (the most registers), dW+dA (own tiles)
            if dt != "bf16" and not (name.startswith("fwd inloop, bias") or name.startswith("dW+dA")
                                     or (name.startswith("dX") and dt == "fp64")):
                continue
            const = dict(common, **flags)
            if kind == "fwd":
                const["BLOCK_R"] = L.block_r(args["R"] if args["R"] else 1)
            if kind == "wgrad":
                t = CB.WGRAD_TILE[mma]
                cfg = {"kwargs": {k: t[k] for k in ("BLOCK_O", "BLOCK_K", "BLOCK_M")},
                       "num_warps": t["num_warps"], "num_stages": t["num_stages"]}
                configs = lambda f, c=cfg: [c]  # noqa: E731
            else:
                configs = lambda f, m=mma: C.conv_configs_for(f, m)  # noqa: E731
            out.append((f"lora_conv2d triton[{name}] {dt}", fns[kind], const, args, configs))
    return out


def _cfg_parts(cfg):
    if isinstance(cfg, dict):
        return cfg["kwargs"], cfg["num_warps"], cfg["num_stages"]
    return cfg.kwargs, cfg.num_warps, cfg.num_stages


def _signature(fn, constexprs, args, dt):
    """Triton's own specialisation of the launch arguments: an int equal to 1 becomes the constant 1,
    one divisible by 16 gets the divisibility hint; pointers are 16-byte aligned (fresh allocations)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    sig, attrs, const = {}, {}, {}
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    for i, n in enumerate(fn.arg_names):
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in defaults:          # a feature flag left at its default (DROP_IN, DROP_OUT: off)
            sig[n], const[n] = "constexpr", defaults[n]
        elif n.endswith("_ptr"):
            elt = "fp64" if dt == "fp64" else "fp32" if dt == "tf32" else dt
            # the scaled preference and the wgrad partials are in the accumulator's dtype
            sig[n] = ("*fp64" if dt == "fp64" else "*fp32") if n in ("ps_ptr", "part_ptr") else "*" + elt
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            kind, key = native_specialize_impl(BaseBackend, int(args[n]), False, True, True)
            if kind == "constexpr":
                sig[n], const[n] = "constexpr", key
            else:
                sig[n] = kind
                if key == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, const


def _sass(cubin: bytes) -> str | None:
    from triton import knobs
    try:
        tool = knobs.nvidia.cuobjdump.path
    except Exception:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else None


def compile_row(name, fn, constexprs, args, cfg, arch) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs, warps, stages = _cfg_parts(cfg)
    const = dict(constexprs, **kwargs)
    dt = const.pop("_dtype")
    sig, attrs, ones = _signature(fn, const, args, dt)
    const.update(ones)
    label = " ".join(f"{'B' + k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in kwargs.items())
    label += f" w{warps} s{stages}"
    row = dict(kernel=name, config=label, arch=arch, registers=None, spills=None, smem=None,
               tensor_core=None, error=None, expect_tc=dt in ("bf16", "fp16", "tf32"),
               expect_tma=bool(const.get("TMA", False)))
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", ARCHS[arch], 32),
                               options={"num_warps": warps, "num_stages": stages})
    except Exception as exc:   # a config that does not compile is a failure of the report
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        return row
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    row["registers"] = int(regs.group(1)) if regs else None
    row["spills"] = sum(int(a) + int(b) for a, b in spills) if spills else None
    row["smem"] = k.metadata.shared
    ptx_op, sass_op = TC[arch]
    in_ptx = ptx_op in k.asm["ptx"]
    sass = _sass(k.asm["cubin"]) if row["expect_tc"] or row["expect_tma"] else None   # cuobjdump: ~0.5 s a row
    found = in_ptx and (sass is None or sass_op in sass)
    row["tensor_core"] = (f"{ptx_op.split('.')[0]}/{sass_op}" if found else
                          "none" if row["expect_tc"] else "none (IEEE FMA)")
    if row["expect_tma"]:
        row["tma"] = TMA_OPS[1] if TMA_OPS[0] in k.asm["ptx"] and (sass is None or TMA_OPS[1] in sass) else "none"
    return row


def _compile_job(job):
    name, arch, cfg = job
    for vname, fn, const, args, _ in _variants():
        if vname == name:
            return compile_row(name, fn, const, args, cfg, arch)
    raise KeyError(name)


def triton_rows(archs=("sm_80", "sm_90"), workers=None):
    """Every Triton kernel x shipped config (the arch family's plus the default family's) x arch."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import triton
    jobs = []
    for name, _, _, _, configs in _variants():
        for arch in archs:
            seen = []
            # the default family serves the GPUs without a family of their own (sm_86, sm_89): Ampere
            # and Ada, compiled here as sm_80; an sm_90 GPU always runs the sm_90 family
            for cfg in configs(arch) + (configs("default") if arch == "sm_80" else []):
                if _cfg_parts(cfg) not in seen:
                    seen.append(_cfg_parts(cfg))
                    jobs.append((name, arch, cfg))
    # a fresh cache, so ptxas really runs and its -v log (registers, spills) is there to read;
    # forked workers inherit both knobs (one ptxas per core: ~1 s per config)
    with tempfile.TemporaryDirectory() as cache:
        prev, triton.knobs.cache.dir = triton.knobs.cache.dir, cache
        prev_log, triton.knobs.nvidia.dump_ptxas_log = triton.knobs.nvidia.dump_ptxas_log, True
        try:
            with ProcessPoolExecutor(workers or os.cpu_count() or 1,
                                     mp_context=multiprocessing.get_context("fork")) as pool:
                return list(pool.map(_compile_job, jobs))
        finally:
            triton.knobs.cache.dir, triton.knobs.nvidia.dump_ptxas_log = prev, prev_log


def problems(row) -> list:
    """Why a row fails (empty: it passes)."""
    out = []
    if row.get("error"):
        out.append(row["error"])
        return out
    if row.get("spills") is None or row["spills"] > 0:
        out.append(f"spills {row.get('spills')} bytes")
    limit = SMEM_LIMIT.get(str(row.get("arch")))
    if limit is not None and (row.get("smem") is None or row["smem"] > limit):
        out.append(f"smem {row.get('smem')} > {limit}")
    if row.get("expect_tc") and row.get("tensor_core") in (None, "none", False):
        out.append("no tensor-core instruction")
    if row.get("expect_tma") and row.get("tma") in (None, "none"):
        out.append("no TMA load (cp.async.bulk.tensor / UTMALDG)")
    # CUDA C++ rows (cuda_report): the cp.async pipeline, ldmatrix fragments, no 64-bit division
    if row.get("expect_ldgsts") and not row.get("ldgsts"):
        out.append("no LDGSTS (cp.async)")
    if row.get("expect_ldsm") and not row.get("ldsm"):
        out.append("no LDSM (ldmatrix)")
    if row.get("div64"):
        out.append(f"{row['div64']} 64-bit division sequences")
    return out


def _table(rows) -> str:
    cols = KEYS + ("status",)
    cells = [[str(r.get(c, "")) for c in KEYS] + ["; ".join(problems(r)) or "ok"] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(x) for x in cells])


def main() -> int:
    from ..backends.triton import linear
    if linear.INTERPRET:
        print("kernel_report: TRITON_INTERPRET=1 is set; unset it to compile for real GPU targets",
              file=sys.stderr)
        return 2
    t0 = time.time()
    rows = triton_rows()
    try:
        from .cuda_report import cuda_rows
    except ImportError:
        cuda_rows = None
    if cuda_rows is not None:
        try:
            rows += list(cuda_rows())
        except Exception as exc:
            rows.append(dict(kernel="cuda_report.cuda_rows()", config="", arch="", registers=None, spills=None,
                             smem=None, tensor_core=None, error=f"{type(exc).__name__}: {exc}"[:200]))
    print(_table(rows))
    bad = [r for r in rows if problems(r)]
    print(f"\n{len(rows)} kernel/config/arch rows, {len(bad)} failing, compiled in {time.time() - t0:.0f} s "
          f"(triton {__import__('triton').__version__}, ptxas from the triton wheel; no GPU used)")
    return 1 if bad else 0


if __name__ == "__main__":
    # the report compiles for real targets: the interpreter switch must be off before triton loads
    if "triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
