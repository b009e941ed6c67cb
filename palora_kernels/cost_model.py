"""Cost model of the palora::lora_mm paths: FLOPs and HBM bytes per kernel, roofline time per GPU.

ONE piece of code serves two readers: the Triton dispatch picks the cheapest path with
:func:`choose_path`, and ``benchmarks/estimate_h100.py`` prints the same numbers as a report.
The times are ESTIMATES (a roofline from published peak rates), never measurements.

Problem (op names of palora::lora_mm): x (N, K) @ wm (K, M), rank R = T * r.

  path      kernels                                   executed FLOPs              HBM bytes (elt = dtype size)
  unfused   base GEMM + per task: shrink, expand,     2NKM + T(2NKr + 2NrM)       NK + KM + NM + M
            *s, *p_t, y + update (PEFT / reference)                               + T(NK + 8NM + ...)
  inloop    one fused GEMM; H from the x tile         2NKM + 2NK Rp ceil(M/BN)    NK + KM + NM + M + KR + RM + NR
            already loaded (recomputed per column)      + 2N Rp M
  split     skinny shrink writes H; GEMM starts from  2NK Rp + 2N Rp M + 2NKM     2NK + KM + NM + M + KR + RM + 2NR
            (H*S) @ up
  merged    W_eff = wm + (down*S) @ up; shrink for H; 2K Rp M + 2NK Rp + 2NKM     3KM + 2NK + NM + ... (per-batch p only)
            plain GEMM with W_eff

Rp is R padded to the tensor-core tile the kernels use (>= 16). Each operand is counted once
(ideal L2 reuse), so bytes are a lower bound; time per kernel = max(FLOPs / peak, bytes / bandwidth)
+ an assumed launch overhead. The merged path must still write H (the backward needs it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

PATHS = ("inloop", "split", "merged")
MAX_INLOOP_R = 64          # the in-loop shrink keeps an (BLOCK_M, Rp) fp32 accumulator in registers


@dataclass(frozen=True)
class GPUSpec:
    """Published dense peak rates of one GPU family (no sparsity)."""
    name: str
    flops: Dict[str, float]        # FLOP/s per compute dtype key (see dtype_key)
    hbm: float                     # bytes/s
    block_n: int                   # BLOCK_N of the family's large shipped config (in-loop recompute factor)
    launch_s: float = 3e-6         # ASSUMED per-kernel launch + tail cost, not a published number
    source: str = ""


GPUS = {
    "sm_90": GPUSpec(
        "H100 SXM5", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12,
                      "fp64": 66.9e12}, 3.35e12, block_n=128,
        source="NVIDIA H100 datasheet: bf16/fp16 989.4 TFLOP/s dense, tf32 494.7, fp32 66.9, "
               "fp64 tensor 66.9; HBM3 3.35 TB/s"),
    "sm_80": GPUSpec(
        "A100 SXM4 80GB", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12,
                           "fp64": 19.5e12}, 2.039e12, block_n=128,
        source="NVIDIA A100 datasheet: bf16/fp16 312 TFLOP/s dense, tf32 156, fp32 19.5, "
               "fp64 tensor 19.5; HBM2e 2.039 TB/s"),
}
GPUS["default"] = GPUS["sm_80"]    # unknown GPUs and the interpreter: the A100 balance point


def gpu_family(device: Optional[torch.device]) -> str:
    """'sm_80' | 'sm_90' | 'default' for a device (CPU/interpreter -> 'default'). Queries at call time."""
    if device is None or torch.device(device).type != "cuda":
        return "default"
    cap = torch.cuda.get_device_capability(device)
    return {(8, 0): "sm_80", (9, 0): "sm_90"}.get(cap, "default")


def dtype_key(dtype: torch.dtype, allow_tf32: bool = False) -> str:
    if dtype == torch.float32:
        return "tf32" if allow_tf32 else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


def padded_rank(R: int) -> int:
    """R as the kernels execute it: one tile of next_pow2(R) >= 16, or chunks of 64."""
    if R <= MAX_INLOOP_R:
        return max(16, 1 << (R - 1).bit_length())
    return math.ceil(R / 64) * 64


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float

    def time(self, gpu: GPUSpec, dkey: str) -> float:
        return max(self.flops / gpu.flops[dkey], self.bytes / gpu.hbm) + gpu.launch_s

    def bound(self, gpu: GPUSpec, dkey: str) -> str:
        return "compute" if self.flops / gpu.flops[dkey] >= self.bytes / gpu.hbm else "memory"


@dataclass
class PathCost:
    path: str
    kernels: List[Kernel] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return sum(k.flops for k in self.kernels)

    @property
    def bytes(self) -> float:
        return sum(k.bytes for k in self.kernels)

    def time(self, gpu: GPUSpec, dkey: str) -> float:
        return sum(k.time(gpu, dkey) for k in self.kernels)


def path_cost(path: str, N: int, K: int, M: int, R: int, T: int, elt: int, *, bias: bool = True,
              block_n: int = 128) -> PathCost:
    """FLOPs and bytes of one lora_mm (or of the unfused loop) on x (N, K), wm (K, M), rank R."""
    Rp, b = padded_rank(R), (M if bias else 0)
    r = R // T
    if path == "unfused":
        ks = [Kernel("base GEMM", 2 * N * K * M, elt * (N * K + K * M + N * M + b))]
        for t in range(T):
            ks += [Kernel(f"shrink t{t}", 2 * N * K * r, elt * (N * K + K * r + N * r)),
                   Kernel(f"expand t{t}", 2 * N * r * M, elt * (N * r + r * M + N * M)),
                   Kernel(f"*s t{t}", N * M, elt * 2 * N * M),
                   Kernel(f"*p_t t{t}", N * M, elt * 2 * N * M),
                   Kernel(f"y+= t{t}", N * M, elt * 3 * N * M)]
        return PathCost(path, ks)
    if path == "inloop":
        redo = math.ceil(M / block_n)         # every column tile recomputes its rows' H
        return PathCost(path, [Kernel("fused GEMM (in-loop shrink)",
                                      2 * N * K * M + 2 * N * K * Rp * redo + 2 * N * Rp * M,
                                      elt * (N * K + K * M + N * M + b + K * R + R * M + N * R))])
    shrink = Kernel("skinny shrink H = x down", 2 * N * K * Rp, elt * (N * K + K * R + N * R))
    if path == "split":
        return PathCost(path, [shrink, Kernel("GEMM from (H*S) up", 2 * N * Rp * M + 2 * N * K * M,
                                              elt * (N * R + R * M + N * K + K * M + N * M + b))])
    if path == "merged":
        return PathCost(path, [Kernel("merge W_eff", 2 * K * Rp * M, elt * (2 * K * M + K * R + R * M)),
                               shrink,
                               Kernel("GEMM with W_eff", 2 * N * K * M, elt * (N * K + K * M + N * M + b))])
    raise ValueError(f"path: expected one of unfused, {', '.join(PATHS)}, got {path!r}")


def allowed_paths(R: int, per_batch: bool) -> List[str]:
    paths = ["split"]
    if R <= MAX_INLOOP_R:
        paths.insert(0, "inloop")
    if per_batch:
        paths.append("merged")
    return paths


def choose_path(N: int, K: int, M: int, R: int, T: int, dtype: torch.dtype, family: str = "default",
                *, per_batch: bool, bias: bool = True, allow_tf32: bool = False) -> str:
    """The path with the smallest roofline estimate on ``family`` (ties: the first, fewest kernels)."""
    gpu, dkey = GPUS[family], dtype_key(dtype, allow_tf32)
    elt = torch.empty((), dtype=dtype).element_size()
    costs = {p: path_cost(p, N, K, M, R, T, elt, bias=bias, block_n=gpu.block_n).time(gpu, dkey)
             for p in allowed_paths(R, per_batch)}
    return min(costs, key=costs.get)
