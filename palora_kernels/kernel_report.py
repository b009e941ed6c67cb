"""Compile every kernel with every shipped config for sm_80 and sm_90, ahead of time (no GPU needed).

    python -m palora_kernels.kernel_report

For each (kernel, config, arch) it reads the registers and spill bytes from the ptxas log, the
shared memory from the compiled kernel's metadata, and looks for tensor-core instructions
(sm_80: mma.sync / HMMA, sm_90: wgmma / HGMMA) in the PTX and the SASS (cuobjdump from the triton
wheel). Prints one table and exits 1 if any config fails to compile, spills, exceeds the shared
memory of its arch, or (a bf16 kernel) runs without tensor cores. fp32 (IEEE) and fp64 run on FMA
units by design: their rows say so and are not failures for it.
Rows of palora_kernels.ops.cuda_report.cuda_rows() (the CUDA C++ kernels), if that module
exists, are checked and printed the same way.

Compiled for bf16 (the tensor-core configs; fp16 tiles are the same size) and fp32 / fp64 (the
FMA configs), T=3 tasks of rank 8 (R=24 -> BLOCK_R=32), contiguous
forward strides (the unit strides specialised as at launch), 16-byte aligned pointers/sizes.
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
KEYS = ("kernel", "config", "arch", "registers", "spills", "smem", "tensor_core")


DTYPES = ("bf16", "fp32", "fp64")    # one per MMA class: tensor cores, IEEE fp32 FMA, fp64 FMA


def _variants():
    """(name, jit fn, constexprs, unit strides, configs(arch family)) of every shipped kernel x dtype."""
    import triton.language as tl
    from .triton import linear as L

    mm_units = ("stride_xk", "stride_wk", "stride_dk", "stride_ur", "stride_pt", "stride_on", "stride_hr")
    out = []
    for dt in DTYPES:
        mma = L.mma_class(dt)
        common = dict(UPCAST=False, ACC_DTYPE=tl.float64 if dt == "fp64" else tl.float32,
                      INPUT_PRECISION="ieee", BLOCK_R=L.block_r(24), _dtype=dt)
        for name, inloop, expand, per_sample in (("lora_mm[inloop, per-sample p]", True, True, True),
                                                 ("lora_mm[inloop, per-batch p]", True, True, False),
                                                 ("lora_mm[split, per-sample p]", False, True, True),
                                                 ("lora_mm[merged GEMM]", False, False, False)):
            c = dict(common, HAS_BIAS=True, PER_SAMPLE_PREF=per_sample, SHRINK_IN_LOOP=inloop, EXPAND=expand)
            out.append((f"{name} {dt}", L._lora_mm_kernel.fn, c, mm_units, lambda f, m=mma: L.configs_for(f, m)))
            if inloop and per_sample and dt == "bf16":   # the in-loop limit R = 64: most registers
                out.append((f"lora_mm[inloop, per-sample p, R=64] {dt}", L._lora_mm_kernel.fn,
                            dict(c, BLOCK_R=L.block_r(64)), mm_units, lambda f, m=mma: L.configs_for(f, m)))
        out.append((f"lora_shrink {dt}", L._lora_shrink_kernel.fn, dict(common),
                    ("stride_xk", "stride_dk", "stride_hr"), lambda f, m=mma: L.skinny_configs_for(f, m)))
        t = L.MERGE_TILE[mma]
        merge_cfg = {"kwargs": {"BLOCK_K": t["BLOCK_K"], "BLOCK_N": t["BLOCK_N"]}, "num_warps": t["num_warps"],
                     "num_stages": 2}
        out.append((f"lora_merge {dt}", L._lora_merge_kernel, dict(common),
                    ("stride_wk", "stride_dk", "stride_ur", "stride_pt", "stride_en"), lambda f, c=merge_cfg: [c]))
    return out


def _cfg_parts(cfg):
    if isinstance(cfg, dict):
        return cfg["kwargs"], cfg["num_warps"], cfg["num_stages"]
    return cfg.kwargs, cfg.num_warps, cfg.num_stages


def _signature(fn, constexprs, dt):
    sig = {}
    for n in fn.arg_names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n == "ps_ptr":
            sig[n] = "*fp64" if dt == "fp64" else "*fp32"
        elif n.endswith("_ptr"):
            sig[n] = "*" + dt
        else:
            sig[n] = "i32"
    # what a launch on aligned, multiple-of-16 tensors specialises: pointers and sizes divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and n not in ("R", "rank", "rows_per_sample", "M_BUCKET")}
    return sig, attrs


def _sass_has(cubin: bytes, op: str) -> bool | None:
    from triton import knobs
    try:
        tool = knobs.nvidia.cuobjdump.path
    except Exception:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True)
    return op in res.stdout if res.returncode == 0 else None


def compile_row(name, fn, constexprs, units, cfg, arch) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs, warps, stages = _cfg_parts(cfg)
    const = dict(constexprs, **kwargs, **{u: 1 for u in units})
    dt = const.pop("_dtype")
    sig, attrs = _signature(fn, const, dt)
    label = " ".join(f"{'B' + k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in kwargs.items())
    label += f" w{warps} s{stages}"
    row = dict(kernel=name, config=label, arch=arch, registers=None, spills=None, smem=None,
               tensor_core=None, error=None, expect_tc=dt in ("bf16", "fp16"))
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
    in_sass = _sass_has(k.asm["cubin"], sass_op)
    found = in_ptx and in_sass is not False
    row["tensor_core"] = (f"{ptx_op.split('.')[0]}/{sass_op}" if found else
                          "none" if row["expect_tc"] else "none (IEEE FMA)")
    return row


def _compile_job(job):
    name, arch, cfg = job
    for vname, fn, const, units, _ in _variants():
        if vname == name:
            return compile_row(name, fn, const, units, cfg, arch)
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
            for cfg in configs(arch) + configs("default"):
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
    return out


def _table(rows) -> str:
    cols = KEYS + ("status",)
    cells = [[str(r.get(c, "")) for c in KEYS] + ["; ".join(problems(r)) or "ok"] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(x) for x in cells])


def main() -> int:
    from .triton import linear
    if linear.INTERPRET:
        print("kernel_report: TRITON_INTERPRET=1 is set; unset it to compile for real GPU targets",
              file=sys.stderr)
        return 2
    t0 = time.time()
    rows = triton_rows()
    try:
        from .ops.cuda_report import cuda_rows
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
