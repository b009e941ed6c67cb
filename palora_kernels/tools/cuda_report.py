"""Static facts of the compiled CUDA kernels in palora_kernels._C, read with ``cuobjdump``.

``cuda_rows()`` gives one dict per kernel and arch: kernel, config, arch, registers, spills
(bytes of local memory: 0 means ptxas spilled nothing), smem (static shared bytes per block),
tensor_core (number of HMMA/mma instructions in its SASS), and the memory-pipeline facts of its
SASS: ldgsts (cp.async global->shared copies, LDGSTS), ldsm (ldmatrix loads of WMMA fragments,
LDSM), div64 (64-bit integer divisions: the reciprocal I2F.U64.RP that starts nvcc's 64-bit
division sequence, inline or in a called subroutine; 0 means none anywhere in the kernel, so none
in its main loop), div32 (32-bit divisions by a runtime value, I2F.U32.RP: the grouped tile order,
once per block) and calls (subroutine returns, RET.REL: nvcc's division routines are subroutines).
expect_ldgsts / expect_ldsm say what kernel_report requires of the row. cuobjdump ships in triton's wheel
(triton/backends/nvidia/bin), so no CUDA toolkit is needed at run time. No GPU is needed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import List, Optional

# tile configs of csrc/cuda/lora_gemm.cuh (BM x BN x BK, 128 threads)
_CONFIGS = {"FusedCfg": ("fused", "64x64x32"), "ShrinkCfg": ("shrink", "128x32x32")}
_DTYPES = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}
# lora_gemm_kernel<T, Cfg, Gather G, BKMAJ>: G 0 dense (lora_mm), 1 im2col (lora_conv2d, and the dG
# shrink of lora_conv2d_dgrad), 2 the transposed gather of lora_conv2d_dgrad
_KERNEL = re.compile(r"lora_gemm_kernelI(f|6__half|13__nv_bfloat16)NS_(\d+)(\w+?Cfg)ELi([012])ELb([01])E")
_GATHER_OP = {"0": "lora_mm", "1": "lora_conv2d", "2": "lora_conv2d_dgrad"}
# csrc/cuda/mtlora_mm.cuh: mtlora_gemm_kernel<T, BKMAJ> (lora_gemm's K loop, the T+1-output epilogue)
_MTLORA = re.compile(r"mtlora_gemm_kernelI(f|6__half|13__nv_bfloat16)Lb([01])E")
# and mtlora_dropout_kernel<T> (the Philox mask of LoRA dropout, elementwise)
_MTDROP = re.compile(r"mtlora_dropout_kernelI(f|6__half|13__nv_bfloat16)E")
_PREF = re.compile(r"pref_grad_(partial|finish)_kernel(?:I(f|6__half|13__nv_bfloat16)E)?")
# csrc/cuda/conv_wgrad.cuh: conv_wgrad_kernel<T> (the split-K GEMM) and conv_wgrad_finish_kernel<T>
_WGRAD = re.compile(r"conv_wgrad_(kernel|finish_kernel)I(f|6__half|13__nv_bfloat16)E")
_TC = re.compile(r"\b(HMMA|IMMA|HGMMA|mma)\b")
# SASS opcodes counted per kernel (the column name, the pattern)
_SASS = {"ldgsts": re.compile(r"\bLDGSTS\b"), "ldsm": re.compile(r"\bLDSM\b"),
         "div64": re.compile(r"\bI2F\.U64\.RP\b"), "div32": re.compile(r"\bI2F\.U32\.RP\b"),
         "calls": re.compile(r"\bRET\.REL")}


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from triton's wheel, else $CUDA_HOME/bin, else PATH."""
    try:
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    p = os.path.join(home, "bin", "cuobjdump")
    return p if os.path.exists(p) else shutil.which("cuobjdump")


def extension_path() -> Optional[str]:
    try:
        from .. import _C
    except ImportError:
        return None
    return _C.__file__


def unavailable_reason() -> Optional[str]:
    """Why cuda_rows() would be empty (None when it has rows to give)."""
    import torch
    from .. import _ext
    if not _ext._C_AVAILABLE:
        return f"palora_kernels._C is not built ({_ext._C_ERROR})"
    if not hasattr(torch.ops.palora, "lora_mm_cuda"):
        return f"palora_kernels._C holds no CUDA code (torch {torch.__version__}, cuda={torch.version.cuda})"
    if find_cuobjdump() is None:
        return "cuobjdump not found (install triton, or set CUDA_HOME)"
    return None


def _dump(flag: str, path: str) -> str:
    res = subprocess.run([find_cuobjdump(), flag, path], capture_output=True, text=True, check=True)
    return res.stdout


def _name(mangled: str):
    m = _KERNEL.search(mangled)
    wm = _WGRAD.search(mangled)
    if wm:
        dtype = _DTYPES[wm.group(2)]
        if wm.group(1) == "finish_kernel":
            return "lora_conv2d_wgrad.finish", f"{dtype} 128 threads simt"
        return "lora_conv2d_wgrad.splitk", (f"{dtype} tile 64x64x32 128 threads {'wmma' if dtype != 'fp32' else 'simt'} "
                                            f"A m-major B n-major")
    md = _MTDROP.search(mangled)
    if md:
        return "mtlora_mm.dropout", f"{_DTYPES[md.group(1)]} 128 threads simt"
    mt = _MTLORA.search(mangled)
    if mt:
        dtype = _DTYPES[mt.group(1)]
        return "mtlora_mm.gemm", (f"{dtype} tile 64x64x32 128 threads {'wmma' if dtype != 'fp32' else 'simt'} "
                                  f"B {'k' if mt.group(2) == '1' else 'n'}-major")
    if not m:
        pm = _PREF.search(mangled)
        if pm:   # csrc/cuda/pref_grad.cuh: the partial sums are per dtype, the finish reads fp32
            return f"pref_grad.{pm.group(1)}", f"{_DTYPES[pm.group(2)] if pm.group(2) else 'fp32'} 128 threads simt"
        return mangled, ""
    dtype, cfg, bk = _DTYPES[m.group(1)], m.group(3), m.group(5) == "1"
    role, tile = _CONFIGS.get(cfg, (cfg, "?"))
    op = _GATHER_OP[m.group(4)]
    return (f"{op}.{role}", f"{dtype} tile {tile} 128 threads {'wmma' if dtype != 'fp32' else 'simt'} "
                            f"B {'k' if bk else 'n'}-major")


def cuda_rows(path: Optional[str] = None) -> List[dict]:
    """One row per (kernel, arch); [] when the extension has no CUDA code (see unavailable_reason)."""
    if path is None:
        if unavailable_reason() is not None:
            return []
        path = extension_path()
    elif find_cuobjdump() is None:
        return []
    rows, index = [], {}
    arch = None
    for line in _dump("-res-usage", path).splitlines():
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        u = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if u and arch:
            if (arch, fn) in index:   # a kernel instantiated by two translation units: compiled twice
                index[(arch, fn)]["error"] = "compiled in more than one translation unit (csrc/cuda/kernels_*.cu)"
                continue
            kernel, config = _name(fn)
            row = {"kernel": kernel, "config": config, "arch": arch, "registers": int(u.group(1)),
                   "spills": int(u.group(2)) + int(u.group(4)), "smem": int(u.group(3)), "tensor_core": 0,
                   "function": fn, **{k: 0 for k in _SASS}}
            if _KERNEL.search(fn) or kernel in ("lora_conv2d_wgrad.splitk", "mtlora_mm.gemm"):
                # GEMM kernels have a cp.async path (not the all-gather dX of the conv: its A and B tiles
                # are both gathered element by element; wgrad's is dY in channels_last); 16-bit ones WMMA
                # from smem
                row["expect_ldgsts"] = kernel != "lora_conv2d_dgrad.fused"
                row["expect_ldsm"] = config.startswith(("fp16", "bf16")) and int(arch[3:]) >= 80
            index[(arch, fn)] = row
            rows.append(row)
    arch = fn = None
    for line in _dump("-sass", path).splitlines():
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
        elif fn and (arch, fn) in index:
            row = index[(arch, fn)]
            if _TC.search(line):
                row["tensor_core"] += 1
            for key, pat in _SASS.items():
                if pat.search(line):
                    row[key] += 1
    return rows


if __name__ == "__main__":
    why = unavailable_reason()
    if why:
        print(f"no CUDA kernels: {why}")
    for r in cuda_rows():
        print(f"{r['kernel']:20s} {r['config']:50s} {r['arch']:6s} regs {r['registers']:4d} "
              f"spills {r['spills']:3d} smem {r['smem']:6d} tensor_core {r['tensor_core']:3d} "
              f"ldgsts {r['ldgsts']:3d} ldsm {r['ldsm']:3d} div64 {r['div64']} div32 {r['div32']} calls {r['calls']}")
