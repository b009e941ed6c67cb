"""ESTIMATE (analytic roofline, not a measurement): unfused LoRA vs the fused lora_mm paths on H100.

    PYTHONPATH=. python benchmarks/estimate_h100.py [--family sm_90|sm_80] [--dtype bf16]

Prints FLOPs and HBM bytes of one PaLoRA linear forward (palora::lora_mm; the dX pass is the same
op with in/out swapped) for T=3, r=8, in=out=4096, N in {256, 4096, 16384}, from
palora_kernels.cost_model -- the very code the Triton dispatch uses to choose its path.
No GPU exists on this project's machines: no number here was timed.
"""
from __future__ import annotations

import argparse

import torch

from palora_kernels import cost_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def report(family: str = "sm_90", dtype: torch.dtype = torch.bfloat16, T: int = 3, r: int = 8,
           in_f: int = 4096, out_f: int = 4096, Ns=(256, 4096, 16384)) -> str:
    gpu, dkey = cost_model.GPUS[family], cost_model.dtype_key(dtype)
    elt = torch.empty((), dtype=dtype).element_size()
    R = T * r
    lines = [
        f"ESTIMATE -- roofline model, not a measurement. GPU: {gpu.name} ({family}); {gpu.source}.",
        f"Per kernel: time = max(FLOPs / {gpu.flops[dkey] / 1e12:.1f} TFLOP/s, bytes / {gpu.hbm / 1e12:.2f} TB/s)"
        f" + {gpu.launch_s * 1e6:.0f} us assumed launch overhead. Bytes count each operand once (ideal L2"
        " reuse), so they are a lower bound; FLOPs are executed FLOPs (R padded to the MMA tile:"
        f" R={R} -> {cost_model.padded_rank(R)}; in-loop recomputes H per {gpu.block_n}-wide column tile).",
        f"Problem: y = x W^T + b + s sum_t p_t (x A_t^T) B_t^T, T={T}, r={r}, in={in_f}, out={out_f}, "
        f"{dkey}, per-batch preference (merged allowed), forward only.",
        "",
    ]
    hdr = f"{'N':>7} {'path':<8} {'kernels':>7} {'GFLOP':>9} {'MB moved':>9} {'est. us':>8} {'bound':<8} " \
          f"{'bytes/unfused':>13} {'speedup':>8}"
    for N in Ns:
        lines += [hdr, "-" * len(hdr)]
        costs = {p: cost_model.path_cost(p, N, in_f, out_f, R, T, elt, block_n=gpu.block_n)
                 for p in ("unfused",) + cost_model.PATHS}
        base = costs["unfused"]
        choice = cost_model.choose_path(N, in_f, out_f, R, T, dtype, family, per_batch=True)
        for p, c in costs.items():
            bound = "/".join(sorted({k.bound(gpu, dkey) for k in c.kernels}))
            mark = "  <- cost model's choice" if p == choice else ""
            lines.append(f"{'N=' + str(N):>7} {p:<8} {len(c.kernels):>7} {c.flops / 1e9:>9.1f} "
                         f"{c.bytes / 1e6:>9.1f} {c.time(gpu, dkey) * 1e6:>8.1f} {bound:<8} "
                         f"{c.bytes / base.bytes:>13.2f} {base.time(gpu, dkey) / c.time(gpu, dkey):>7.2f}x{mark}")
        temp = T * 8 * N * out_f * elt      # per task: write (N,out), *s r+w, *p r+w, y+= r+r+w
        best = costs[choice]
        lines += [
            "",
            f"  why: unfused moves {base.bytes / 1e6:.0f} MB, of which {temp / 1e6:.0f} MB are the {T} per-task "
            f"(N, out) temporaries (written by the expand, then read+written by *s, *p_t and y += update) and "
            f"{T * N * in_f * elt / 1e6:.0f} MB re-reading x for each shrink, over {len(base.kernels)} launches. "
            f"{choice} moves {best.bytes / 1e6:.0f} MB in {len(best.kernels)} launch(es): "
            f"the adapter costs {100 * (best.bytes / costs['unfused'].kernels[0].bytes - 1):.1f}% bytes and "
            f"{100 * (best.flops / costs['unfused'].kernels[0].flops - 1):.1f}% FLOPs over the base GEMM alone.",
            "",
        ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sm_90", choices=sorted(cost_model.GPUS))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    a = ap.parse_args()
    print(report(a.family, DTYPES[a.dtype]))


if __name__ == "__main__":
    main()
