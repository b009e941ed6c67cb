"""Cost model of the palora::lora_mm paths: FLOPs and HBM bytes per kernel, roofline time per GPU.

ONE piece of code serves two readers: the Triton backend picks the cheapest path with
:func:`choose_path`, and ``benchmarks/estimate_h100.py`` prints the same numbers as a report.
The times are ESTIMATES (a roofline from published peak rates and the assumptions below), never
measurements: no GPU exists on this project's machines.

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
  cublas    the torch backend on CUDA: cuBLAS GEMM    2NKM + 2NK Rp + 2N Rp M     2NK + KM + 3NM + M + KR + RM + 2NR
            y = x wm + b, skinny GEMM H = x down,
            in-place addmm y += (H*S) up

Rp is R padded to the tensor-core tile the kernels use (>= 16). Each operand is counted once
(ideal L2 reuse), so bytes are a lower bound. Time per kernel =
max(FLOPs / (peak * compute efficiency * wave efficiency), bytes / (bandwidth * memory efficiency))
+ an assumed launch cost. The merged path must still write H (the backward needs it).

ASSUMED, not measured (the constants below, each with its reason):
- cuBLAS reaches CUBLAS_EFF of the dense peak on large GEMMs and, choosing among many tiles and
  split-K, loses nothing to wave quantization;
- the Triton GEMM reaches TRITON_VS_CUBLAS of cuBLAS per family: set for a pointer-load GEMM with no
  warp specialisation, two tensor-core configs per architecture; kept on sm_90, where the GEMM now
  loads its tiles through TMA when the operands allow (docs/triton.md), for want of a measurement;
- the Triton GEMM runs the largest shipped tile the autotuner keeps for the shape (_keep of
  backends/triton/linear.py) and pays its wave quantization on the GPU's SM count; the in-loop shrink
  recomputes H once per column tile of that width. The TMA-only 128x256 tile of sm_90 is not counted
  (configs_for without tma): as "the largest kept tile" it would be charged at N=256 on a 4096-wide
  layer with 32 tiles for 132 SMs (q 4096->4096 in-loop 40.5 -> 70.6 us), where the autotuner, which
  times every kept config, would run 128x128 instead;
- memory-bound kernels of either kind reach MEM_EFF of the HBM bandwidth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

PATHS = ("inloop", "split", "merged", "cublas")
FUSED_PATHS = ("inloop", "split", "merged")
MAX_INLOOP_R = 64          # the in-loop shrink keeps an (BLOCK_M, Rp) fp32 accumulator in registers


@dataclass(frozen=True)
class GPUSpec:
    """Published dense peak rates of one GPU family (no sparsity)."""
    name: str
    flops: Dict[str, float]        # FLOP/s per compute dtype key (see dtype_key)
    hbm: float                     # bytes/s
    block_n: int                   # BLOCK_N of the family's large shipped config (in-loop recompute factor)
    sms: int = 108                 # streaming multiprocessors (wave quantization)
    launch_s: float = 3e-6         # ASSUMED per-kernel launch + tail cost, not a published number
    source: str = ""


# ASSUMED efficiencies (see the module docstring); none of them was measured here
CUBLAS_EFF = 0.80                                           # of dense peak, large GEMMs
TRITON_VS_CUBLAS = {"sm_80": 0.90, "sm_90": 0.75, "default": 0.85}
MEM_EFF = 0.85                                              # of HBM bandwidth


GPUS = {
    "sm_90": GPUSpec(
        "H100 SXM5", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12,
                      "fp64": 66.9e12}, 3.35e12, block_n=128, sms=132,
        source="NVIDIA H100 datasheet: bf16/fp16 989.4 TFLOP/s dense, tf32 494.7, fp32 66.9, "
               "fp64 tensor 66.9; HBM3 3.35 TB/s"),
    "sm_80": GPUSpec(
        "A100 SXM4 80GB", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12,
                           "fp64": 19.5e12}, 2.039e12, block_n=128, sms=108,
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
    impl: str = "triton"        # "triton" | "cublas": which GEMM efficiency applies
    waves: float = 1.0          # wave efficiency of its tile grid on the GPU (1: no quantization loss)

    def compute_rate(self, gpu: GPUSpec, dkey: str, family: str) -> float:
        eff = CUBLAS_EFF * (TRITON_VS_CUBLAS.get(family, TRITON_VS_CUBLAS["default"]) if self.impl == "triton" else 1)
        return gpu.flops[dkey] * eff * self.waves

    def time(self, gpu: GPUSpec, dkey: str, family: str = "default") -> float:
        return max(self.flops / self.compute_rate(gpu, dkey, family), self.bytes / (gpu.hbm * MEM_EFF)) + gpu.launch_s

    def bound(self, gpu: GPUSpec, dkey: str, family: str = "default") -> str:
        c = self.flops / self.compute_rate(gpu, dkey, family)
        return "compute" if c >= self.bytes / (gpu.hbm * MEM_EFF) else "memory"


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

    def time(self, gpu: GPUSpec, dkey: str, family: str = "default") -> float:
        return sum(k.time(gpu, dkey, family) for k in self.kernels)


def wave_efficiency(N: int, M: int, block_m: int, block_n: int, sms: int) -> float:
    """Useful fraction of the last wave: tiles / (waves * SMs), one tile per SM at a time."""
    tiles = math.ceil(N / block_m) * math.ceil(M / block_n)
    return tiles / (math.ceil(tiles / sms) * sms) if tiles else 1.0


def triton_tile(N: int, M: int, family: str) -> tuple:
    """(BLOCK_M, BLOCK_N) of the largest tensor-core config the Triton autotuner keeps for the shape
    (ASSUMED to be the one it picks); (128, the family's block_n) where triton is not installed."""
    try:
        from .backends.triton.linear import largest_kept_tile
    except ImportError:
        return 128, GPUS[family].block_n
    return largest_kept_tile(N, M, family if family in GPUS and family != "default" else "default")


def path_cost(path: str, N: int, K: int, M: int, R: int, T: int, elt: int, *, bias: bool = True,
              block_n: int = 128, block_m: int = 128, sms: int = 0) -> PathCost:
    """FLOPs and bytes of one lora_mm (or of the unfused loop) on x (N, K), wm (K, M), rank R.

    block_m, block_n: the Triton GEMM's tile; sms > 0 charges its wave quantization on that many SMs."""
    Rp, b = padded_rank(R), (M if bias else 0)
    r = R // T
    waves = wave_efficiency(N, M, block_m, block_n, sms) if sms else 1.0
    if path == "unfused":
        c = "cublas"
        ks = [Kernel("base GEMM", 2 * N * K * M, elt * (N * K + K * M + N * M + b), c)]
        for t in range(T):
            ks += [Kernel(f"shrink t{t}", 2 * N * K * r, elt * (N * K + K * r + N * r), c),
                   Kernel(f"expand t{t}", 2 * N * r * M, elt * (N * r + r * M + N * M), c),
                   Kernel(f"*s t{t}", N * M, elt * 2 * N * M, c),
                   Kernel(f"*p_t t{t}", N * M, elt * 2 * N * M, c),
                   Kernel(f"y+= t{t}", N * M, elt * 3 * N * M, c)]
        return PathCost(path, ks)
    if path == "cublas":
        c = "cublas"
        return PathCost(path, [Kernel("cuBLAS GEMM y = x wm + b", 2 * N * K * M, elt * (N * K + K * M + N * M + b), c),
                               Kernel("cuBLAS skinny H = x down", 2 * N * K * Rp, elt * (N * K + K * R + N * R), c),
                               Kernel("cuBLAS addmm y += (H*S) up", 2 * N * Rp * M,
                                      elt * (N * R + R * M + 2 * N * M), c)])
    if path == "inloop":
        redo = math.ceil(M / block_n)         # every column tile recomputes its rows' H
        return PathCost(path, [Kernel("fused GEMM (in-loop shrink)",
                                      2 * N * K * M + 2 * N * K * Rp * redo + 2 * N * Rp * M,
                                      elt * (N * K + K * M + N * M + b + K * R + R * M + N * R), waves=waves)])
    shrink = Kernel("skinny shrink H = x down", 2 * N * K * Rp, elt * (N * K + K * R + N * R))
    if path == "split":
        return PathCost(path, [shrink, Kernel("GEMM from (H*S) up", 2 * N * Rp * M + 2 * N * K * M,
                                              elt * (N * R + R * M + N * K + K * M + N * M + b), waves=waves)])
    if path == "merged":
        return PathCost(path, [Kernel("merge W_eff", 2 * K * Rp * M, elt * (2 * K * M + K * R + R * M)),
                               shrink,
                               Kernel("GEMM with W_eff", 2 * N * K * M, elt * (N * K + K * M + N * M + b),
                                      waves=waves)])
    raise ValueError(f"path: expected one of unfused, {', '.join(PATHS)}, got {path!r}")


def allowed_paths(R: int, per_batch: bool, dtype: torch.dtype = torch.float32, cublas: bool = False) -> List[str]:
    """merged needs one preference for the batch, and fp32/fp64: it forms W_eff in the input dtype,
    and rounding W + delta to bf16 lost 47% of a small adapter delta (interpreter, 2x the forward error).
    cublas: the torch composition is a candidate (on a GPU; not under the interpreter, whose point is to
    run the Triton kernels)."""
    paths = ["split"]
    if R <= MAX_INLOOP_R:
        paths.insert(0, "inloop")
    if per_batch and dtype in (torch.float32, torch.float64):
        paths.append("merged")
    if cublas:
        paths.append("cublas")
    return paths


def path_times(N: int, K: int, M: int, R: int, T: int, dtype: torch.dtype, family: str = "default", *,
               per_batch: bool, bias: bool = True, allow_tf32: bool = False, cublas: bool = False) -> Dict[str, float]:
    """Estimated seconds of every allowed path on ``family`` (see the module docstring's assumptions)."""
    gpu, dkey = GPUS[family], dtype_key(dtype, allow_tf32)
    elt = torch.empty((), dtype=dtype).element_size()
    bm, bn = triton_tile(N, M, family)
    return {p: path_cost(p, N, K, M, R, T, elt, bias=bias, block_m=bm, block_n=bn, sms=gpu.sms).time(gpu, dkey, family)
            for p in allowed_paths(R, per_batch, dtype, cublas)}


def choose_path(N: int, K: int, M: int, R: int, T: int, dtype: torch.dtype, family: str = "default",
                *, per_batch: bool, bias: bool = True, allow_tf32: bool = False, cublas: bool = False) -> str:
    """The path with the smallest estimate on ``family`` (ties: the first, fewest kernels)."""
    costs = path_times(N, K, M, R, T, dtype, family, per_batch=per_batch, bias=bias, allow_tf32=allow_tf32,
                       cublas=cublas)
    return min(costs, key=costs.get)
