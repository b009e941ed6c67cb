"""ESTIMATE (analytic roofline, not a measurement): unfused LoRA vs the fused lora_mm paths on H100.

    PYTHONPATH=. python benchmarks/estimate_h100.py [--family sm_90|sm_80] [--dtype bf16]
    PYTHONPATH=. python benchmarks/estimate_h100.py --winners      # which path the cost model picks

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
        f"Per kernel: time = max(FLOPs / ({gpu.flops[dkey] / 1e12:.1f} TFLOP/s x efficiency), bytes / "
        f"({gpu.hbm / 1e12:.2f} TB/s x {cost_model.MEM_EFF})) + {gpu.launch_s * 1e6:.0f} us assumed launch overhead;"
        f" efficiency: cuBLAS {cost_model.CUBLAS_EFF}, Triton {cost_model.TRITON_VS_CUBLAS[family]} of that"
        " x its wave quantization (ASSUMED). Bytes count each operand once (ideal L2"
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
        bm, bn = cost_model.triton_tile(N, out_f, family)
        costs = {p: cost_model.path_cost(p, N, in_f, out_f, R, T, elt, block_m=bm, block_n=bn, sms=gpu.sms)
                 for p in ("unfused",) + cost_model.PATHS}
        base = costs["unfused"]
        choice = cost_model.choose_path(N, in_f, out_f, R, T, dtype, family, per_batch=True, cublas=True)
        for p, c in costs.items():
            bound = "/".join(sorted({k.bound(gpu, dkey, family) for k in c.kernels}))
            mark = "  <- cost model's choice" if p == choice else ""
            tt = c.time(gpu, dkey, family)
            lines.append(f"{'N=' + str(N):>7} {p:<8} {len(c.kernels):>7} {c.flops / 1e9:>9.1f} "
                         f"{c.bytes / 1e6:>9.1f} {tt * 1e6:>8.1f} {bound:<8} "
                         f"{c.bytes / base.bytes:>13.2f} {base.time(gpu, dkey, family) / tt:>7.2f}x{mark}")
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


# (name, K = in features (conv: C_in*kh*kw of the implicit GEMM), M = out, T, r). Convs are modelled
# as their implicit GEMM (rows = batch*H*W); Triton has no conv kernel yet, so those rows say what
# the model would pick for one.
LAYERS = [("LLaMA-7B q/k/v/o 4096->4096", 4096, 4096, 3, 8), ("LLaMA-7B gate/up 4096->11008", 4096, 11008, 3, 8),
          ("LLaMA-7B down 11008->4096", 11008, 4096, 3, 8), ("SegNet conv 3x3 512->512", 4608, 512, 2, 4),
          ("MultiLeNet conv2 5x5 10->20", 250, 20, 2, 4), ("MultiLeNet fc 2880->50", 2880, 50, 2, 4)]
NS = (1, 16, 256, 4096, 16384)


def winners(families=("sm_80", "sm_90"), dtypes=(torch.bfloat16, torch.float32)) -> str:
    """Markdown: the path the cost model picks (per-sample preference, so no merged path), with the
    estimated time of the winner and of the best fused kernel, for each layer, N, dtype and family."""
    out = ["ESTIMATE -- the cost model's choice (palora_kernels.cost_model.choose_path, cublas allowed), "
           "not a measurement. Assumed: cuBLAS at "
           f"{cost_model.CUBLAS_EFF:.0%} of peak with no wave loss; Triton at "
           + ", ".join(f"{f} {v:.0%}" for f, v in cost_model.TRITON_VS_CUBLAS.items() if f != "default")
           + f" of cuBLAS with the wave quantization of its largest kept tile; memory at {cost_model.MEM_EFF:.0%} "
           "of HBM. fp32 = TF32 allowed. Per-sample preference. Cell: winner (est. us; best fused kernel us).", ""]
    for fam in families:
        for dt in dtypes:
            key = cost_model.dtype_key(dt, allow_tf32=True)
            out += [f"{cost_model.GPUS[fam].name} ({fam}), {key}:", "",
                    "| layer | " + " | ".join(f"N={n}" for n in NS) + " |", "|---" * (len(NS) + 1) + "|"]
            for name, K, M, T, r in LAYERS:
                cells = []
                for n in NS:
                    t = cost_model.path_times(n, K, M, T * r, T, dt, fam, per_batch=False, allow_tf32=True, cublas=True)
                    win = min(t, key=t.get)
                    fused = min(v for p, v in t.items() if p != "cublas")
                    cells.append(f"{win} ({t[win] * 1e6:.1f}; {fused * 1e6:.1f})")
                out.append(f"| {name} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sm_90", choices=sorted(cost_model.GPUS))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--winners", action="store_true", help="the table of which path wins per layer and N")
    a = ap.parse_args()
    print(winners() if a.winners else report(a.family, DTYPES[a.dtype]))


if __name__ == "__main__":
    main()
