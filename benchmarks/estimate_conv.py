"""ESTIMATE (analytic roofline, not a measurement): one factorized PaLoRA conv forward, unfused
(PEFT-style) vs the fused Triton kernel vs a merged weight, for a SegNet and a ResNet-18 layer.

    PYTHONPATH=. python benchmarks/estimate_conv.py [--family sm_90|sm_80] [--write docs/conv_estimate.md]

Bytes count each tensor once per kernel that touches it (ideal L2 reuse of the im2col halo, so a
lower bound); FLOPs are executed FLOPs. Times use palora_kernels.cost_model's GPU table, assumed
efficiencies and launch overhead (cost_model.Kernel.time). No GPU exists on this project's
machines: no number here was timed.
"""
from __future__ import annotations

import argparse
import math

from palora_kernels import cost_model
from palora_kernels.cost_model import Kernel, PathCost

ELT = 2    # bf16
# (name, batch, C_in, C_out, H, W (output = input: stride 1, "same"), k, T, r)
LAYERS = [("SegNet 3x3 512->512, 8 x 32x64", 8, 512, 512, 32, 64, 3, 2, 4),
          ("ResNet-18 3x3 256->256, 32 x 14x14", 32, 256, 256, 14, 14, 3, 3, 4)]


def paths(B, Ci, Co, H, W, k, T, r, block_n=128):
    """{path: PathCost} of one forward; M = B*H*W rows, K = Ci*k*k."""
    M, K, R = B * H * W, Ci * k * k, T * r
    Rp = cost_model.padded_rank(R)
    x, y, w = B * Ci * H * W, M * Co, Co * K
    base = Kernel("base conv (cuDNN)", 2 * M * K * Co, ELT * (x + w + y), "cublas")
    unfused = [base]
    for t in range(T):
        unfused += [Kernel(f"shrink conv A_{t} (C_in -> r)", 2 * M * K * r, ELT * (x + r * K + M * r), "cublas"),
                    Kernel(f"1x1 conv B_{t} (r -> C_out), (N, C_out, H, W) temporary", 2 * M * r * Co,
                           ELT * (M * r + Co * r + y), "cublas"),
                    Kernel(f"* s * p_{t} (read + write the temporary)", 2 * y, ELT * 2 * y, "cublas"),
                    Kernel(f"y += update_{t}", y, ELT * 3 * y, "cublas")]
    redo = math.ceil(Co / block_n)     # each column tile recomputes its rows' H in the in-loop shape
    fused = [Kernel("Triton implicit GEMM, in-loop shrink, expand in the epilogue",
                    2 * M * K * Co + 2 * M * K * Rp * redo + 2 * M * Rp * Co,
                    ELT * (x + w + R * K + Co * R + y + M * R))]
    split = [Kernel("Triton shrink H = im2col(x) A_cat^T", 2 * M * K * Rp, ELT * (x + R * K + M * R)),
             Kernel("Triton implicit GEMM from (H*S) B_cat^T", 2 * M * K * Co + 2 * M * Rp * Co,
                    ELT * (x + w + M * R + Co * R + y))]
    merged = [Kernel("merge W_eff = W + B_cat S A_cat (per-batch p)", 2 * Co * K * R, ELT * (2 * w + R * K + Co * R)),
              Kernel("one conv with W_eff", 2 * M * K * Co, ELT * (x + w + y), "cublas")]
    return {"unfused": PathCost("unfused", unfused), "fused in-loop": PathCost("fused in-loop", fused),
            "fused split": PathCost("fused split", split), "merged": PathCost("merged", merged)}


def report(family: str = "sm_90") -> str:
    gpu = cost_model.GPUS[family]
    out = [
        "# Conv estimate: unfused vs fused vs merged (ESTIMATE)",
        "",
        "Made by `PYTHONPATH=. python benchmarks/estimate_conv.py --write docs/conv_estimate.md`. "
        "ESTIMATE -- an analytic roofline, not a measurement (no GPU on this project's machines). "
        f"GPU: {gpu.name} ({family}); {gpu.source}. bf16, one forward, factorized adapters, T tasks of rank r. "
        "Per kernel: time = max(FLOPs / (peak x efficiency), bytes / (HBM x "
        f"{cost_model.MEM_EFF})) + {gpu.launch_s * 1e6:.0f} us launch (palora_kernels.cost_model.Kernel.time; "
        f"cuDNN at {cost_model.CUBLAS_EFF} of peak, Triton at {cost_model.TRITON_VS_CUBLAS[family]} of that, "
        "ASSUMED). Bytes count each tensor once per kernel (ideal L2 reuse of the im2col halo): a lower bound. "
        "Unfused is PEFT's loop: the base conv, then per task a kh x kw conv C_in -> r, a 1x1 conv r -> C_out "
        "that writes an (N, C_out, H, W) temporary, the preference scaling and the add (each a pass over "
        "that temporary). Merged needs a per-batch preference and gives no H (inference).",
        "",
    ]
    for name, B, Ci, Co, H, W, k, T, r in LAYERS:
        ps = paths(B, Ci, Co, H, W, k, T, r, gpu.block_n)
        base = ps["unfused"]
        t0 = base.time(gpu, "bf16", family)
        out += [f"## {name}, T={T}, r={r} (rows {B * H * W}, K {Ci * k * k})", "",
                "| path | kernels | GFLOP | MB moved | est. us | bytes / unfused | est. speedup |",
                "|---|---|---|---|---|---|---|"]
        for p, c in ps.items():
            tt = c.time(gpu, "bf16", family)
            out.append(f"| {p} | {len(c.kernels)} | {c.flops / 1e9:.2f} | {c.bytes / 1e6:.1f} | {tt * 1e6:.1f} | "
                       f"{c.bytes / base.bytes:.2f} | {t0 / tt:.2f}x |")
        temp = T * 4 * B * Co * H * W * ELT      # expand writes it, the scaling reads + writes it, the add reads it
        out += ["", f"Unfused moves {base.bytes / 1e6:.1f} MB, {temp / 1e6:.1f} MB of it the {T} (N, C_out, H, W) "
                    f"temporaries (written, then read+written by the scaling, then read by the add); the fused "
                    f"kernel adds {100 * (ps['fused in-loop'].bytes / base.kernels[0].bytes - 1):.1f}% bytes and "
                    f"{100 * (ps['fused in-loop'].flops / base.kernels[0].flops - 1):.1f}% FLOPs to the base conv.",
                ""]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="sm_90", choices=["sm_90", "sm_80"])
    ap.add_argument("--write", default=None, help="also write the markdown to this file")
    a = ap.parse_args()
    text = report(a.family)
    print(text)
    if a.write:
        open(a.write, "w").write(text)


if __name__ == "__main__":
    main()
