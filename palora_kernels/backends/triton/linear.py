"""Triton kernels of palora::lora_mm:  y = x @ wm + bias + ((x @ down) * S) @ up,  H = x @ down.

Inside the kernels the GEMM is named as in Triton tutorial 03, C (M, N) = A (M, K) @ B (K, N):
M = rows of x (the op's N), N = output columns (the op's M), K = reduction, R = T * r.
The same kernels serve the forward (wm, down, up) = (W^T, A_cat^T, B_cat^T) and dX
(W, B_cat, A_cat): only the strides differ.

Three paths (palora_kernels.cost_model chooses, :func:`use_path` forces):
  inloop  _lora_mm_kernel(SHRINK_IN_LOOP): H accumulates from the x tile already loaded for
          the base GEMM; the programs of the first column tile write H. One launch.
  split   _lora_shrink_kernel writes H, then _lora_mm_kernel starts its accumulator from the
          (H*S) @ up tile and adds x @ wm. No (N, out) temporary, x read twice.
  merged  _lora_merge_kernel: W_eff = wm + (down*S) @ up (per-batch preference only), then
          _lora_shrink_kernel for H (the backward needs it) and a plain GEMM with W_eff.
None of the kernels accumulates into memory it did not zero itself, so autotuning is safe.

LoRA dropout (docs/dropout.md), in-kernel: the mask element of logical index i is
tl.rand(drop_seed, drop_offset + i) >= drop_p, i = row * drop_sr + col * drop_sc, drawn where the
tile is used and never stored. DROP_IN (forward): the x tile feeding the shrink is masked and scaled
by 1/(1-p), the base GEMM reads it unmasked. DROP_OUT (dX): the low-rank term (dH A_cat) is masked
before it joins the base product. The merged path cannot express a mask on x alone: not under dropout.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from ... import cost_model

# The interpreter replaces @triton.jit at decoration time, so read the knob right here.
INTERPRET = bool(triton.knobs.runtime.interpret)
if INTERPRET:           # its fp32 -> bf16 cast truncates; a GPU rounds to nearest (see _interpreter.py)
    from ._interpreter import round_bf16_to_nearest
    round_bf16_to_nearest()

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


# ----------------------------------------------------------------------------------------------
# autotune configs: one function per GPU family, pruned by keep() at launch time.
# Each config serves one MMA class: "tc" (bf16/fp16 tiles on tensor cores) or "fp32"/"fp64"
# (IEEE FMA: no tensor cores, 2-4x the smem per tile, so much smaller tiles; kernel_report measured
# the 128x128 tc tiles in fp32 at 128-255 registers + 8-11 KB spills, in fp64 over the smem limit).
# ----------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps, stages, family, mma="tc", group_m=8, loads="any"):
    # loads: "any" (pointer loads or TMA), "tma" (a tile that compiles without spills only when the x, W
    # and up tiles come through TMA descriptors: launched only where the launcher takes the TMA variant)
    c = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                      num_warps=warps, num_stages=stages)
    c.family, c.mma, c.loads = family, mma, loads
    return c


def _tf32_configs(family):
    # fp32 tiles on tensor cores (TF32): 4-byte tiles, so BLOCK_K 32 where bf16 takes 64 (same smem).
    # 64x64 needs 8 warps: with 4, ptxas capped it at 128 registers and spilled 28 bytes (sm_80, split).
    if family == "sm_90":
        # 128x256 through TMA (x, W, up): 0 spills in all 14 TF32 launch sets with w8 s3 (164-235
        # registers, smem <= 163864) and w16 s3 (90-128); never tried on the pointer path (bf16 spills there)
        return [_cfg(128, 128, 32, 8, 3, family, "tf32"), _cfg(64, 128, 32, 4, 4, family, "tf32"),
                _cfg(128, 256, 32, 8, 3, family, "tf32", loads="tma"),
                _cfg(128, 256, 32, 16, 3, family, "tf32", loads="tma")]
    if family == "sm_80":
        return [_cfg(128, 128, 32, 8, 3, family, "tf32"), _cfg(64, 64, 32, 8, 4, family, "tf32")]
    return [_cfg(64, 64, 32, 8, 3, family, "tf32")]


def _fma_configs(family):
    # fp64 64x64 with 8 warps spilled 24 bytes in-loop (sm_80); 32x64 with BLOCK_K 32 spilled 8-16
    # bytes in the split kernel with the launcher's real strides (sm_90 with 3 stages, sm_80 dX with 2);
    # BLOCK_K 16 spills in none of the 14 fp64 variants on either arch
    return [_cfg(64, 64, 32, 8, 3, family, "fp32"), _cfg(32, 64, 16, 4, 3, family, "fp64")]


def configs_sm80():
    # A100: 164 KB smem. 128x128 needs 8 warps: with 4, acc (128 fp32/thread) + the in-loop
    # H accumulator spilled 168 bytes (kernel_report, ptxas 13). No TMA on sm_80, and the wider tiles
    # spill with pointer loads (bf16, w8 s3, BLOCK_K 32): 128x256 28 bytes (split dX, per-sample) and 704
    # (in-loop R=64), 256x128 48-64 (split) and 1220 (in-loop R=64): not shipped.
    return ([_cfg(128, 128, 32, 8, 4, "sm_80"), _cfg(64, 64, 64, 4, 4, "sm_80")] + _tf32_configs("sm_80")
            + _fma_configs("sm_80"))


def configs_sm90():
    # H100: 228 KB smem; BLOCK_M 128 with 8 warps = two warpgroups for wgmma. 64x128 with 4 warps
    # spilled 12 bytes (split, per-sample, no bias); with 8 warps it does not.
    # 128x256 (kernel_report, bf16, the 13 launched stride sets): with pointer loads it spilled 388 bytes
    # with 8 warps and 188 with 16 (split, per-sample): never launched on that path. Through TMA with x
    # and W only, the split forward still spilled 16-400 bytes (w8 s3/s4) and 144-324 (w16), the R=64
    # in-loop 352-456: its column-major up tile (B_cat^T, R=24) loaded element by element. With up
    # through TMA too: 0 spills in all 13 with w8 s3 (182-242 registers, smem <= 172056), w8 s4 (smem
    # up to 229408 of 232448: not shipped, 3 KB from the limit) and w16 s3 (106-128 registers).
    return ([_cfg(128, 128, 64, 8, 3, "sm_90"), _cfg(64, 128, 64, 8, 4, "sm_90"),
             _cfg(128, 256, 64, 8, 3, "sm_90", loads="tma"), _cfg(128, 256, 64, 16, 3, "sm_90", loads="tma")]
            + _tf32_configs("sm_90") + _fma_configs("sm_90"))


def configs_default():
    # unknown GPUs (sm_86/89 have ~100 KB smem): one modest tile.
    return [_cfg(64, 64, 32, 4, 3, "default")] + _tf32_configs("default") + _fma_configs("default")


def configs_interpreter():
    # one config (autotuning needs a GPU). Small tiles so the tests cross tile edges in M, N, K.
    return [_cfg(16, 32, 16, 4, 1, "interpreter", "any", group_m=2)]


def configs_for(family: str, mma: str = None, tma: bool = False):
    """The family's configs of one MMA class (None: all) that the pointer-load kernel launches, plus
    the TMA-only ones when ``tma``."""
    cfgs = {"sm_80": configs_sm80, "sm_90": configs_sm90, "default": configs_default,
            "interpreter": configs_interpreter}[family]()
    return [c for c in cfgs if (mma is None or c.mma in (mma, "any")) and (tma or c.loads == "any")]


ALL_FAMILIES = ("sm_80", "sm_90", "default", "interpreter")


def mma_class(dtype, precision: str = "ieee") -> str:
    """'tc' for 16-bit tiles, 'tf32' for fp32 tiles on tensor cores, 'fp32' / 'fp64' for the IEEE
    FMA path (torch or tl dtype; precision is the kernels' INPUT_PRECISION)."""
    name = str(dtype).split(".")[-1]
    if name in ("float32", "fp32"):
        return "tf32" if precision == "tf32" else "fp32"
    return {"float64": "fp64", "fp64": "fp64"}.get(name, "tc")


def _mine(configs, named_args):
    family = "interpreter" if INTERPRET else cost_model.gpu_family(named_args["x_ptr"].device)
    mma = mma_class(named_args["x_ptr"].dtype, named_args.get("INPUT_PRECISION", "ieee"))
    tma = bool(named_args.get("TMA", False))
    return [c for c in configs if c.family == family and c.mma in (mma, "any")
            and (tma or getattr(c, "loads", "any") == "any")]


def _keep(cfg, M, N):
    """Drop tiles far larger than the problem (a 128-row tile for 20 rows wastes the MMA)."""
    kw = cfg.kwargs
    return kw["BLOCK_M"] <= max(64, triton.next_power_of_2(M)) and kw["BLOCK_N"] <= max(64, triton.next_power_of_2(N))


def largest_kept_tile(M, N, family: str, mma: str = "tc") -> tuple:
    """(BLOCK_M, BLOCK_N) of the largest config _keep leaves for an (M, N) output (the cost model's tile;
    the TMA-only ones are not counted, see cost_model)."""
    cfgs = configs_for(family, mma)
    kept = [c for c in cfgs if _keep(c, M, N)] or cfgs[-1:]
    c = max(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]


def _prune(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}     # the autotuner passes keyword arguments separately
    mine = _mine(configs, named_args)
    kept = [c for c in mine if _keep(c, named_args["M"], named_args["N"])]
    return kept or mine[-1:]


_ALL_CONFIGS = [c for f in ALL_FAMILIES for c in configs_for(f, tma=True)]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # The interpreter (Triton 3.8 on CPU) returns garbage for bf16 tl.dot: upcast there only; on a GPU
    # the tiles stay bf16/fp16 and hit the tensor cores.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: GROUP_M row tiles share each column tile of the
    weight while it is in L2 (Triton tutorial 03's swizzle; every GEMM-shaped kernel here uses it)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _scale_tile(ps_ptr, offs_m, offs_r, mask_m, mask_r, rows_per_sample, rank, stride_pp, stride_pt,
                ACC_DTYPE: tl.constexpr, PER_SAMPLE_PREF: tl.constexpr):
    # S[m, j] = (scale * pref)[m // rows_per_sample, j // rank]; ps = scale * pref, made on the host
    col = offs_r // rank
    if PER_SAMPLE_PREF:
        row = offs_m // rows_per_sample
        s = tl.load(ps_ptr + row[:, None] * stride_pp + col[None, :] * stride_pt,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    else:
        s = tl.load(ps_ptr + col * stride_pt, mask=mask_r, other=0.0)[None, :]
    return s.to(ACC_DTYPE)


@triton.jit
def _drop_tile(t, offs_row, offs_col, drop_p, drop_seed, drop_offset, drop_sr, drop_sc, dscale):
    # t * mask / (1-p); mask element i = row*drop_sr + col*drop_sc kept iff tl.rand(seed, offset + i) >= p.
    # i in int64: offsets past 2**32 keep their high word, and N * in may pass 2**31
    idx = drop_offset + offs_row.to(tl.int64)[:, None] * drop_sr + offs_col.to(tl.int64)[None, :] * drop_sc
    keep = tl.rand(drop_seed, idx) >= drop_p
    return tl.where(keep, t.to(dscale.dtype) * dscale, 0.0)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=_ALL_CONFIGS,
                 key=["M_BUCKET", "N", "K", "R", "SHRINK_IN_LOOP", "EXPAND", "INPUT_PRECISION", "TMA"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _lora_mm_kernel(
    # pointers
    x_ptr,      # (M, K)
    w_ptr,      # (K, N)   wm, or W_eff on the merged path
    bias_ptr,   # (N,)     read when HAS_BIAS
    down_ptr,   # (K, R)   read when SHRINK_IN_LOOP
    up_ptr,     # (R, N)   read when EXPAND
    ps_ptr,     # (P, T)   scale * pref
    out_ptr,    # (M, N)   y
    h_ptr,      # (M, R)   H: written when SHRINK_IN_LOOP, read otherwise (split)
    # sizes
    M, N, K, R, rank, rows_per_sample,
    # strides
    stride_xm, stride_xk, stride_wk, stride_wn, stride_dk, stride_dr, stride_ur, stride_un,
    stride_pp, stride_pt, stride_om, stride_on, stride_hm, stride_hr,
    M_BUCKET,   # next_pow2(M): autotune key only, so a new batch size does not retune
    # LoRA dropout (read when DROP_IN / DROP_OUT): p (fp32), seed, offset, mask index strides
    drop_p, drop_seed, drop_offset, drop_sr, drop_sc,
    dscale_ptr,  # (1,)   1 / (1 - p) in ACC_DTYPE
    # features
    HAS_BIAS: tl.constexpr, PER_SAMPLE_PREF: tl.constexpr, SHRINK_IN_LOOP: tl.constexpr,
    EXPAND: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DROP_IN: tl.constexpr = False, DROP_OUT: tl.constexpr = False,
    TMA: tl.constexpr = False,   # x, w (and up) tiles through tensor descriptors (sm_90 TMA; tma_problem() holds)
    W_T: tl.constexpr = False,   # with TMA: w is the transpose of a row-major (N, K) matrix (the forward's W^T)
    UP_T: tl.constexpr = False,  # with TMA: up is the transpose of a row-major (N, R) matrix (the forward's B_cat)
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if TMA and EXPAND:
        # the forward's up (B_cat^T) is column-major: as a pointer tile (R=24, no 16-element hint) it loads
        # element by element, and at BLOCK_N 256 the split kernel spilled 16-400 bytes (kernel_report)
        if UP_T:
            up_desc = tl.make_tensor_descriptor(up_ptr, [N, R], [stride_un, 1], [BLOCK_N, BLOCK_R])
        else:
            up_desc = tl.make_tensor_descriptor(up_ptr, [R, N], [stride_ur, 1], [BLOCK_R, BLOCK_N])

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # int64: M*K may pass 2^31
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)

    if EXPAND and not SHRINK_IN_LOOP:
        # split: start from (H * S) @ up, R in chunks of BLOCK_R
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            mask_r = rr < R
            h = tl.load(h_ptr + offs_m[:, None] * stride_hm + rr[None, :] * stride_hr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            g = h.to(ACC_DTYPE) * _scale_tile(ps_ptr, offs_m, rr, mask_m, mask_r, rows_per_sample, rank,
                                              stride_pp, stride_pt, ACC_DTYPE, PER_SAMPLE_PREF)
            if TMA:
                if UP_T:
                    u = up_desc.load([pid_n * BLOCK_N, r0]).T
                else:
                    u = up_desc.load([r0, pid_n * BLOCK_N])
            else:
                u = tl.load(up_ptr + rr[:, None] * stride_ur + offs_n[None, :] * stride_un,
                            mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = _dot(g.to(u.dtype), u, acc, UPCAST, INPUT_PRECISION)
        if DROP_OUT:   # acc holds the low-rank term only so far
            acc = _drop_tile(acc, offs_m, offs_n, drop_p, drop_seed, drop_offset, drop_sr, drop_sc,
                             tl.load(dscale_ptr))

    if TMA:
        # device-side descriptors (128 B of global scratch per program, from triton's allocator): the
        # copy engine fetches whole tiles into smem, zero-filled past the edges, with no per-element
        # address or mask registers. Last stride 1 and 16-byte row strides: checked by tma_problem()
        x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
        if W_T:
            w_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [stride_wn, 1], [BLOCK_N, BLOCK_K])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, [K, N], [stride_wk, 1], [BLOCK_K, BLOCK_N])
    else:
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    if SHRINK_IN_LOOP:
        mask_r = offs_r < R
        d_ptrs = down_ptr + offs_k[:, None] * stride_dk + offs_r[None, :] * stride_dr
        h_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        if TMA:
            x = x_desc.load([pid_m * BLOCK_M, k0])
            if W_T:
                w = w_desc.load([pid_n * BLOCK_N, k0]).T
            else:
                w = w_desc.load([k0, pid_n * BLOCK_N])
        else:
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(x, w, acc, UPCAST, INPUT_PRECISION)
        if SHRINK_IN_LOOP:
            d = tl.load(d_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if DROP_IN:
                xd = _drop_tile(x, offs_m, k0 + offs_k, drop_p, drop_seed, drop_offset, drop_sr, drop_sc,
                                tl.load(dscale_ptr)).to(x.dtype)
                h_acc = _dot(xd, d, h_acc, UPCAST, INPUT_PRECISION)
            else:
                h_acc = _dot(x, d, h_acc, UPCAST, INPUT_PRECISION)
            d_ptrs += BLOCK_K * stride_dk
        if not TMA:
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

    if SHRINK_IN_LOOP:
        if EXPAND:
            g = h_acc * _scale_tile(ps_ptr, offs_m, offs_r, mask_m, mask_r, rows_per_sample, rank,
                                    stride_pp, stride_pt, ACC_DTYPE, PER_SAMPLE_PREF)
            if TMA:
                if UP_T:
                    u = up_desc.load([pid_n * BLOCK_N, 0]).T
                else:
                    u = up_desc.load([0, pid_n * BLOCK_N])
            else:
                u = tl.load(up_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                            mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            if DROP_OUT:   # the low-rank term in its own tile, masked, then added to the base product
                low = _dot(g.to(u.dtype), u, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE), UPCAST, INPUT_PRECISION)
                acc += _drop_tile(low, offs_m, offs_n, drop_p, drop_seed, drop_offset, drop_sr, drop_sc,
                                  tl.load(dscale_ptr))
            else:
                acc = _dot(g.to(u.dtype), u, acc, UPCAST, INPUT_PRECISION)
        if pid_n == 0:
            tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                     h_acc.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _prune_skinny(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}
    mine = _mine(configs, named_args)
    kept = [c for c in mine if c.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(named_args["M"]))]
    return kept or mine[-1:]


def _skinny_cfg(bm, bk, warps, stages, family, mma="tc"):
    c = triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
    c.family, c.mma = family, mma
    return c


def skinny_configs_for(family: str, mma: str = None):
    # memory-bound (reads x once, R <= 64 columns per program): long K tiles, many rows in flight
    # fp64 32x64 spilled 8 bytes on sm_90 (kernel_report); 32x32 does not
    # fp32 64x64 spilled 668 bytes on the dX strides (down = B_cat, row stride R) on sm_80; 64x32 does not
    fma = [_skinny_cfg(64, 32, 4, 3, family, "fp32"), _skinny_cfg(64, 64, 4, 3, family, "tf32"),
           _skinny_cfg(32, 32, 4, 3, family, "fp64")]
    cfgs = {"sm_80": [_skinny_cfg(64, 128, 4, 4, "sm_80")] + fma,
            "sm_90": [_skinny_cfg(128, 128, 8, 4, "sm_90"), _skinny_cfg(64, 128, 4, 4, "sm_90")] + fma,
            "default": [_skinny_cfg(64, 64, 4, 3, "default")] + fma,
            "interpreter": [_skinny_cfg(16, 16, 4, 1, "interpreter", "any")]}[family]
    return [c for c in cfgs if mma is None or c.mma in (mma, "any")]


@triton.autotune(configs=[c for f in ALL_FAMILIES for c in skinny_configs_for(f)],
                 key=["M_BUCKET", "K", "R", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_skinny})
@triton.jit
def _lora_shrink_kernel(
    x_ptr,      # (M, K)
    down_ptr,   # (K, R)
    h_ptr,      # (M, R)   H
    M, K, R,
    stride_xm, stride_xk, stride_dk, stride_dr, stride_hm, stride_hr,
    M_BUCKET,
    drop_p, drop_seed, drop_offset, drop_sr, drop_sc, dscale_ptr,   # LoRA dropout on x, read when DROP_IN
    UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DROP_IN: tl.constexpr = False,
):
    # grid (row tiles, R chunks): H[m, r0:r0+BLOCK_R] = x[m, :] @ down[:, r0:r0+BLOCK_R]
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    d_ptrs = down_ptr + offs_k[:, None] * stride_dk + offs_r[None, :] * stride_dr
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        d = tl.load(d_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DROP_IN:
            x = _drop_tile(x, offs_m, k0 + offs_k, drop_p, drop_seed, drop_offset, drop_sr, drop_sc,
                           tl.load(dscale_ptr)).to(x.dtype)
        h = _dot(x, d, h, UPCAST, INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        d_ptrs += BLOCK_K * stride_dk
    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
             h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_merge_kernel(
    w_ptr,      # (K, N)   wm
    down_ptr,   # (K, R)
    up_ptr,     # (R, N)
    ps_ptr,     # (1, T)   scale * pref (per-batch)
    weff_ptr,   # (K, N)   out: wm + (down * S) @ up
    K, N, R, rank,
    stride_wk, stride_wn, stride_dk, stride_dr, stride_ur, stride_un, stride_pt, stride_ek, stride_en,
    UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # K*N*R FLOPs once per preference; one fixed config (it is ~1/N of the GEMM's work)
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_n = offs_n < N
    acc = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                  mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(ACC_DTYPE)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        s = tl.load(ps_ptr + (rr // rank) * stride_pt, mask=mask_r, other=0.0).to(ACC_DTYPE)
        d = tl.load(down_ptr + offs_k[:, None] * stride_dk + rr[None, :] * stride_dr,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        u = tl.load(up_ptr + rr[:, None] * stride_ur + offs_n[None, :] * stride_un,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = _dot((d.to(ACC_DTYPE) * s[None, :]).to(u.dtype), u, acc, UPCAST, INPUT_PRECISION)
    tl.store(weff_ptr + offs_k[:, None] * stride_ek + offs_n[None, :] * stride_en,
             acc.to(weff_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


# merge: one fixed tile per MMA class (run once per preference, ~R/N of the GEMM's FLOPs)
MERGE_TILE = {"tc": {"BLOCK_K": 64, "BLOCK_N": 64, "num_warps": 4},
              "fp32": {"BLOCK_K": 32, "BLOCK_N": 64, "num_warps": 4},    # 64x64: 184 bytes spilled (sm_80)
              "tf32": {"BLOCK_K": 64, "BLOCK_N": 64, "num_warps": 4},    # 32 rows: no wgmma on sm_90
              "fp64": {"BLOCK_K": 32, "BLOCK_N": 64, "num_warps": 4},
              "interpreter": {"BLOCK_K": 32, "BLOCK_N": 32, "num_warps": 4}}


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
_forced_path: Optional[str] = None


@contextlib.contextmanager
def use_path(path: Optional[str]):
    """Force 'inloop' | 'split' | 'merged' | 'cublas' for every lora_mm in the block (tests, benchmarks)."""
    global _forced_path
    if path is not None and path not in cost_model.PATHS:
        raise ValueError(f"path: expected one of {', '.join(cost_model.PATHS)} or None, got {path!r}")
    prev, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = prev


_forced_tma: Optional[bool] = None


@contextlib.contextmanager
def use_tma(on: Optional[bool]):
    """Force the TMA variant of the GEMM on (True: raises where tma_problem() names a reason) or off
    (False) for every lora_mm in the block; None: automatic (sm_90 and the operands qualify). Tests,
    benchmarks. Under the interpreter the descriptors run as masked loads (runtime/interpreter.py)."""
    global _forced_tma
    if on not in (None, True, False):
        raise ValueError(f"on: expected True, False or None, got {on!r}")
    prev, _forced_tma = _forced_tma, on
    try:
        yield
    finally:
        _forced_tma = prev


_TMA_MAX_DIM = 2 ** 31 - 1       # descriptor shapes are int32 (language/semantic.py make_tensor_descriptor)
_TMA_MAX_STRIDE_BYTES = 2 ** 40  # cuTensorMapEncodeTiled: globalStrides < 2^40 bytes


def tma_problem(x, w, mma: str, up=None) -> Optional[str]:
    """Why the GEMM operands x (M, K), w (K, N) and the expand operand up (R, N) (None: merged, no expand)
    cannot be read through TMA descriptors (None: they can).

    TMA (cuTensorMapEncodeTiled) needs a 16-byte aligned base, 16-byte aligned strides but the last, a last
    stride of 1 and sizes that fit the descriptor; the variant serves the tensor-core classes (2- and
    4-byte tiles), where wgmma reads the tiles TMA put in smem. x must be row-major; w and up may be
    row-major (dX: W, A_cat) or the transpose of a row-major matrix (forward: W^T, B_cat^T)."""
    if mma not in ("tc", "tf32"):
        return f"x: TMA serves the tensor-core classes (fp16/bf16, TF32 fp32), got {x.dtype} ({mma})"
    es = x.element_size()
    ops = [("x", x), ("w", w)] + ([("up", up)] if up is not None else [])
    for name, t in ops:
        if t.data_ptr() % 16:
            return f"{name}: TMA needs a 16-byte aligned base address, got {t.data_ptr()} (offset view?)"
        if any(d <= 0 or d > _TMA_MAX_DIM for d in t.shape):
            return f"{name}: TMA needs every size in 1..2^31-1, got {tuple(t.shape)}"
    if x.stride(1) != 1:
        return f"x: TMA needs x (M, K) with column stride 1, got strides {tuple(x.stride())}"
    for name, t in ops:
        row = t.stride(0) if t.stride(1) == 1 else t.stride(1) if t.stride(0) == 1 else None
        if row is None:
            return f"{name}: TMA needs one stride of {name} equal to 1, got strides {tuple(t.stride())}"
        if (row * es) % 16 or row * es >= _TMA_MAX_STRIDE_BYTES:
            return (f"{name}: TMA needs a row stride of a multiple of 16 bytes (below 2^40), got {row} "
                    f"elements of {es} bytes")
    return None


def _tma_choice(x, w, up, prec: str, dropout) -> tuple:
    """(TMA, W_T, UP_T) for a launch (up: None on the merged path): TMA on the sm_90 family where
    tma_problem() finds nothing, not under LoRA dropout (its kernels are compiled and reported on the
    pointer path, kernel_report_dropout)."""
    if _forced_tma is False:
        return False, False, False
    why = tma_problem(x, w, mma_class(x.dtype, prec), up)
    if why is None and dropout is not None:
        why = "x: LoRA dropout keeps the pointer-load kernel"
    if _forced_tma:
        family = "interpreter" if INTERPRET else cost_model.gpu_family(x.device)
        if family not in ("interpreter", "sm_90"):
            why = why or f"x: TMA is compiled for sm_90 only, got a {family} device"
        if why:
            raise ValueError(f"use_tma(True): {why}")
    elif why is not None or INTERPRET or cost_model.gpu_family(x.device) != "sm_90":
        return False, False, False
    return True, w.stride(1) != 1, up is not None and up.stride(1) != 1


@contextlib.contextmanager
def _tma_scratch(device):
    """A device-side descriptor lives in global scratch that triton's launcher asks its allocator for
    (grid x 128 bytes): lend one for the launch unless the user set their own (triton.set_allocator)."""
    from triton.runtime import _allocation
    if INTERPRET or not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(
        lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def block_r(R: int) -> int:
    return cost_model.padded_rank(R) if R <= cost_model.MAX_INLOOP_R else 64


def allow_tf32() -> bool:
    """torch's fp32 matmul setting: TF32 unless the precision is "highest" (torch's default)."""
    return torch.get_float32_matmul_precision() != "highest"


def _precision(dtype: torch.dtype) -> tuple:
    """(UPCAST, ACC_DTYPE, INPUT_PRECISION) for an input dtype."""
    upcast = INTERPRET and dtype == torch.bfloat16
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # fp32 follows torch.set_float32_matmul_precision / torch.backends.cuda.matmul.allow_tf32 as
    # nn.Linear does: IEEE fp32 FMA by default (1e-5 in the tests), TF32 tensor cores when allowed
    return upcast, acc, "tf32" if dtype == torch.float32 and allow_tf32() else "ieee"


def pick_path(N, K, M, R, T, dtype, device, per_batch, bias) -> str:
    if _forced_path is not None:
        if _forced_path == "merged" and not per_batch:
            raise ValueError("path: 'merged' needs a per-batch preference (pref.shape[0] == 1)")
        if _forced_path == "merged" and dtype in (torch.float16, torch.bfloat16):
            raise ValueError(f"path: 'merged' forms W_eff in the input dtype, and {dtype} would round the "
                             "adapter delta away; it runs fp32/fp64 only")
        if _forced_path == "inloop" and R > cost_model.MAX_INLOOP_R:
            raise ValueError(f"path: 'inloop' supports R <= {cost_model.MAX_INLOOP_R}, got R = {R}")
        return _forced_path
    family = "default" if INTERPRET else cost_model.gpu_family(device)
    return cost_model.choose_path(N, K, M, R, T, dtype, family, per_batch=per_batch, bias=bias,
                                  allow_tf32=allow_tf32(), cublas=not INTERPRET)


def lora_mm_dropout(x, wm, bias, down, up, pref, rows_per_sample, scale, p, seed, offset, on_expand):
    """lora_mm under LoRA dropout (palora_kernels._ops): the mask drawn in-kernel, on the shrink's x
    tile, or on the low-rank term when ``on_expand`` (the dX call)."""
    return lora_mm(x, wm, bias, down, up, pref, rows_per_sample, scale, dropout=(p, seed, offset, on_expand))


def lora_mm(x, wm, bias, down, up, pref, rows_per_sample, scale, path: Optional[str] = None, dropout=None):
    """(y, H): y = x wm + bias + ((x down) * S) up (N, M) dense, H = x down (N, R) with a padded
    row stride; see palora_kernels._ops (which checked the arguments).

    x: (N, K); wm: (K, M); bias: (M,) or None; down: (K, R); up: (R, M); pref: (P, T).
    dropout: None or (p, seed, offset, on_expand), see :func:`lora_mm_dropout`.
    """
    from . import RECORD
    N, K = x.shape
    M, R = wm.shape[1], down.shape[1]
    P, T = pref.shape
    y = x.new_empty(N, M)
    h = x.new_empty_strided((N, R), (RECORD.h_row_stride(R), 1))
    if N == 0:
        return y, h
    # merged (W_eff) has no separate adapter input, so it is never picked under dropout
    if dropout is not None and (path or _forced_path) == "merged":
        raise ValueError("path: 'merged' folds the adapters into W and cannot mask their input alone; "
                         "it does not run under LoRA dropout")
    forced = path or _forced_path
    path = path or pick_path(N, K, M, R, T, x.dtype, x.device, P == 1 and dropout is None, bias is not None)
    if dropout is not None and not forced and path in ("cublas", "inloop"):
        # the cost model knows nothing of the mask (docs/dropout.md): in-loop draws x's mask once per
        # column tile (M / BLOCK_N Philox per x element, once in split; an estimate from op counts), its
        # dX needs a second accumulator for the masked low-rank tile (bf16 128x128 on sm_90: 5492 bytes
        # spilled, ptxas), and the cuBLAS composition makes the mask with ~150 int64 torch passes over x
        path = "split"
    if path == "cublas":        # the cost model says cuBLAS composition beats the fused kernels here
        from ..torch import kernels as composed
        if dropout is not None:
            return composed.lora_mm_dropout(x, wm, bias, down, up, pref, rows_per_sample, scale, *dropout)
        return composed.lora_mm(x, wm, bias, down, up, pref, rows_per_sample, scale)
    # launch on x's device (the current stream of that device), whatever device is current
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        _launch(x, wm, bias, down, up, pref, rows_per_sample, scale, y, h, path, dropout)
    return y, h


def lora_dropout_dA(dh, x, p, seed, offset):
    """dA_cat = dH^T (x * mask / (1-p)) (R, in), the mask drawn in-kernel: the skinny shrink kernel
    run on x^T (in, N) against dH (N, R), so no dropped copy of x is made. dh: (N, R); x: (N, in)."""
    N, K = x.shape
    R = dh.shape[1]
    out = x.new_empty((R, K))
    if N == 0 or K == 0 or R == 0:
        return out.zero_()
    upcast, acc_dt, prec = _precision(x.dtype)
    BR = block_r(R)
    xt = x.t()                      # (in, N) view: the "x" of the shrink kernel, reduction over N
    grid = lambda META: (triton.cdiv(K, META["BLOCK_M"]), triton.cdiv(R, BR))  # noqa: E731
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        _lora_shrink_kernel[grid](**dict(shrink_args(xt, dh, out.t()), **drop_args(x, (p, seed, offset), K, True)),
                                  UPCAST=upcast, ACC_DTYPE=acc_dt, INPUT_PRECISION=prec, BLOCK_R=BR, DROP_IN=True)
    return out


def drop_args(x, dropout, cols: int, transpose: bool = False) -> dict:
    """The kernels' dropout arguments: the mask over a row-major (rows, cols) matrix (x, or dX's
    low-rank term), read transposed when ``transpose``. dropout: None or (p, seed, offset, ...)."""
    if dropout is None:
        return dict(drop_p=0.0, drop_seed=0, drop_offset=0, drop_sr=0, drop_sc=0, dscale_ptr=x)
    p, seed, offset = dropout[:3]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    # 1/(1-p) in the accumulator's dtype (a float kernel argument would be fp32 even for fp64 x)
    dscale = torch.full((1,), 1.0 / (1.0 - p), dtype=acc, device=x.device)
    sr, sc = (1, cols) if transpose else (cols, 1)
    return dict(drop_p=p, drop_seed=seed, drop_offset=offset, drop_sr=sr, drop_sc=sc, dscale_ptr=dscale)


def shrink_args(x, down, h, dropout=None) -> dict:
    """The arguments _lora_shrink_kernel gets (kernel_report compiles with these very values)."""
    N, K = x.shape
    return dict(x_ptr=x, down_ptr=down, h_ptr=h, M=N, K=K, R=down.shape[1],
                stride_xm=x.stride(0), stride_xk=x.stride(1), stride_dk=down.stride(0), stride_dr=down.stride(1),
                stride_hm=h.stride(0), stride_hr=h.stride(1), M_BUCKET=triton.next_power_of_2(N),
                **drop_args(x, dropout, K))


def merge_args(wm, down, up, ps, weff, T) -> dict:
    K, M = wm.shape
    R = down.shape[1]
    return dict(w_ptr=wm, down_ptr=down, up_ptr=up, ps_ptr=ps, weff_ptr=weff, K=K, N=M, R=R, rank=R // T,
                stride_wk=wm.stride(0), stride_wn=wm.stride(1), stride_dk=down.stride(0), stride_dr=down.stride(1),
                stride_ur=up.stride(0), stride_un=up.stride(1), stride_pt=ps.stride(1),
                stride_ek=weff.stride(0), stride_en=weff.stride(1))


def mm_args(x, w, bias, down, up, ps, out, h, rows_per_sample, dropout=None) -> dict:
    """The non-constexpr arguments _lora_mm_kernel gets (kernel_report compiles with these values).
    dropout (p, seed, offset, on_expand): the mask is over x (N, K), or over out (N, M) when on_expand."""
    N, K = x.shape
    M, R = w.shape[1], down.shape[1]
    return dict(x_ptr=x, w_ptr=w, bias_ptr=bias if bias is not None else x, down_ptr=down, up_ptr=up,
                ps_ptr=ps, out_ptr=out, h_ptr=h, M=N, N=M, K=K, R=R, rank=R // ps.shape[1],
                rows_per_sample=rows_per_sample,
                stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wk=w.stride(0), stride_wn=w.stride(1),
                stride_dk=down.stride(0), stride_dr=down.stride(1), stride_ur=up.stride(0), stride_un=up.stride(1),
                stride_pp=ps.stride(0), stride_pt=ps.stride(1), stride_om=out.stride(0), stride_on=out.stride(1),
                stride_hm=h.stride(0), stride_hr=h.stride(1), M_BUCKET=triton.next_power_of_2(N),
                **drop_args(x, dropout, M if dropout is not None and dropout[3] else K))


def _launch(x, wm, bias, down, up, pref, rows_per_sample, scale, out, h, path, dropout=None):
    N, K = x.shape
    M, R = wm.shape[1], down.shape[1]
    P, T = pref.shape
    upcast, acc_dt, prec = _precision(x.dtype)
    ps = pref.to(torch.float64 if x.dtype == torch.float64 else torch.float32) * scale   # (P, T), tiny
    BR = block_r(R)
    common = dict(UPCAST=upcast, ACC_DTYPE=acc_dt, INPUT_PRECISION=prec, BLOCK_R=BR)
    drop_in = dropout is not None and not dropout[3]
    drop_out = dropout is not None and dropout[3]
    if path in ("split", "merged"):
        grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]), triton.cdiv(R, BR))  # noqa: E731
        _lora_shrink_kernel[grid](**shrink_args(x, down, h, dropout if drop_in else None), **common,
                                  DROP_IN=drop_in)
    w = wm
    if path == "merged":
        w = torch.empty((K, M), dtype=x.dtype, device=x.device)
        t = MERGE_TILE["interpreter" if INTERPRET else mma_class(x.dtype, prec)]
        _lora_merge_kernel[(triton.cdiv(K, t["BLOCK_K"]), triton.cdiv(M, t["BLOCK_N"]))](
            **merge_args(wm, down, up, ps, w, T), **common,
            BLOCK_K=t["BLOCK_K"], BLOCK_N=t["BLOCK_N"], num_warps=t["num_warps"])
    tma, w_t, up_t = _tma_choice(x, w, up if path != "merged" else None, prec, dropout)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]) * triton.cdiv(M, META["BLOCK_N"]),)  # noqa: E731
    with _tma_scratch(x.device) if tma else contextlib.nullcontext():
        _lora_mm_kernel[grid](**mm_args(x, w, bias, down, up, ps, out, h, rows_per_sample, dropout), **common,
                              HAS_BIAS=bias is not None, PER_SAMPLE_PREF=P != 1, SHRINK_IN_LOOP=path == "inloop",
                              EXPAND=path != "merged", DROP_IN=drop_in and path == "inloop", DROP_OUT=drop_out,
                              TMA=tma, W_T=w_t, UP_T=up_t)
