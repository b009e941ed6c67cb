"""Triton kernels of the conv backward: palora::lora_conv2d_dgrad and palora::lora_conv2d_wgrad.

dgrad, two launches:
  1. dG = B_cat^T dY per pixel: conv2d.py's _conv_fwd_kernel as a 1x1 conv of dY with B_cat^T as its
     weight and no adapter -> dg (N, R, Ho, Wo), unscaled (the Function needs it for dp and dA).
  2. _conv_dgrad_kernel, a transposed implicit GEMM: rows = the N*H*W pixels of dX, columns C_in,
     K = C_out*kh*kw over dY with W, then R*kh*kw over dG with A_cat, dG scaled by S_n in registers
     as it is gathered. [dY | dG*S] is never concatenated and no dH tensor is written: the adapter
     term is R/C_out more K steps in the same accumulator. Tap (i, j) of pixel (hi, wi) reads
     dY[ho, wo] with ho = (hi + pad_h - i*dil_h) / stride_h where that divides exactly.
wgrad, one launch (+ a sum over splits):
  _conv_wgrad_kernel: the GEMM [dY | dG*S]^T (C_out + R, rows) @ im2col(x) (rows, K) with the rows
  N*Ho*Wo as the reduction. Row tiles of the output below C_out read dY, the others dG (scaled in
  registers); both multiply the same im2col(x) tile, so dW and dA come from one pass over x.
  Split-K over the rows: program (o, k, s) reduces rows [s*L, (s+1)*L) into fp32 partials
  (splits, C_out + R, K), summed over s by one torch reduction in a fixed order: deterministic,
  and no atomics. The split count fills ~2 waves of SMs (small outputs, many rows).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ... import _ops
from .conv2d import (_ALL_CONFIGS, _check_int32, _pixels, _prune, _tap, _weight_tile, _x_tile, launch_fwd,
                     scaled_pref)
from .linear import INTERPRET, _dot, _precision, _scale_tile, grouped_tile, mma_class


# ----------------------------------------------------------------------------------------------
# dX
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dgrad_phase(acc, src_ptr, wt_ptr, ps_ptr, n, hp, wp, mask_m, offs_n, mask_n, offs_k, C_src, rank,
                 Ho, Wo, KH, KW, stride_h, stride_w, dil_h, dil_w,
                 s_n, s_c, s_h, s_w, w_o, w_c, w_i, w_j, stride_pp, stride_pt,
                 SCALED: tl.constexpr, PER_SAMPLE_PREF: tl.constexpr, UPCAST: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += gatherT(src) @ wt over K = C_src*kh*kw, tap-major (conv2d._tap); hp = hi + pad_h,
    wp = wi + pad_w per row. src (N, C_src, Ho, Wo): dY (wt = W) or dG (wt = A_cat, SCALED: times S_n)."""
    row = n * s_n
    CB = tl.cdiv(C_src, BLOCK_K)
    for t in range(0, KH * KW * CB):
        cc, mask_c, i, j = _tap(t, CB, KW, offs_k, C_src, BLOCK_K)
        th = hp - i * dil_h
        tw = wp - j * dil_w
        ho = th // stride_h
        wo = tw // stride_w
        ok = (mask_m & (th >= 0) & (tw >= 0) & (ho * stride_h == th) & (wo * stride_w == tw)
              & (ho < Ho) & (wo < Wo))
        a = tl.load(src_ptr + (row + ho * s_h + wo * s_w)[:, None] + (cc * s_c)[None, :],
                    mask=ok[:, None] & mask_c[None, :], other=0.0)
        # the weight as (K, C_in): K's channel runs along dim 0 of W / A_cat, C_in along dim 1
        b = _weight_tile(wt_ptr, cc, mask_c, i, j, offs_n, mask_n, w_c, w_o, w_i, w_j)
        if SCALED:
            s = _scale_tile(ps_ptr, n, cc, mask_m, mask_c, 1, rank, stride_pp, stride_pt, ACC_DTYPE,
                            PER_SAMPLE_PREF)
            a = (a.to(ACC_DTYPE) * s).to(b.dtype)
        acc = _dot(a, b, acc, UPCAST, INPUT_PRECISION)
    return acc


@triton.autotune(configs=_ALL_CONFIGS,
                 key=["M_BUCKET", "N", "K", "KR", "KH", "KW", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _conv_dgrad_kernel(
    # pointers
    x_ptr,      # (Nb, C_out, Ho, Wo)  dY (named x_ptr: the GEMM's A operand, as in the forward)
    w_ptr,      # (C_out, C_in, kh, kw)
    dg_ptr,     # (Nb, R, Ho, Wo)      dG, unscaled; read when HAS_ADAPTER
    a_ptr,      # (R, C_in, kh, kw)    A_cat; read when HAS_ADAPTER
    ps_ptr,     # (P, T)               scale * pref
    dx_ptr,     # (Nb, C_in, H, W)
    # sizes: the GEMM (M, N, K + KR) = (Nb*H*W, C_in, (C_out + R)*kh*kw), and the geometry
    M, N, K, KR, rank,
    H, W, Ho, Wo, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # strides
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_wo, stride_wc, stride_wi, stride_wj,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_ar, stride_ac, stride_ai, stride_aj,
    stride_pp, stride_pt,
    stride_xn, stride_xc, stride_xh, stride_xw,
    M_BUCKET,
    # features
    PER_SAMPLE_PREF: tl.constexpr, HAS_ADAPTER: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    n, hi, wi = _pixels(offs_m, H * W, W)
    hp = hi + pad_h
    wp = wi + pad_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc = _dgrad_phase(acc, x_ptr, w_ptr, ps_ptr, n, hp, wp, mask_m, offs_n, mask_n, offs_k, K // (KH * KW), rank,
                       Ho, Wo, KH, KW, stride_h, stride_w, dil_h, dil_w,
                       stride_yn, stride_yc, stride_yh, stride_yw, stride_wo, stride_wc, stride_wi, stride_wj,
                       stride_pp, stride_pt, False, PER_SAMPLE_PREF, UPCAST, ACC_DTYPE, INPUT_PRECISION, BLOCK_K)
    if HAS_ADAPTER:
        acc = _dgrad_phase(acc, dg_ptr, a_ptr, ps_ptr, n, hp, wp, mask_m, offs_n, mask_n, offs_k, KR // (KH * KW), rank,
                           Ho, Wo, KH, KW, stride_h, stride_w, dil_h, dil_w,
                           stride_gn, stride_gc, stride_gh, stride_gw, stride_ar, stride_ac, stride_ai, stride_aj,
                           stride_pp, stride_pt, True, PER_SAMPLE_PREF, UPCAST, ACC_DTYPE, INPUT_PRECISION,
                           BLOCK_K)
    x_row = n * stride_xn + hi * stride_xh + wi * stride_xw
    tl.store(dx_ptr + x_row[:, None] + offs_n[None, :] * stride_xc,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def dgrad_args(dy, weight, dg, down, ps, dx, stride, padding, dilation) -> dict:
    """The non-constexpr arguments of _conv_dgrad_kernel (kernel_report compiles with these values).
    dg/down None: no adapter term (their pointers alias dy and are never read)."""
    Nb, C_out, Ho, Wo = dy.shape
    _, C_in, kh, kw = weight.shape
    H, W = dx.shape[2:]
    R = down.shape[0] if down is not None else 0
    return dict(
        x_ptr=dy, w_ptr=weight, dg_ptr=dg if dg is not None else dy, a_ptr=down if down is not None else weight,
        ps_ptr=ps, dx_ptr=dx, M=Nb * H * W, N=C_in, K=C_out * kh * kw, KR=R * kh * kw,
        rank=max(R // ps.shape[1], 1), H=H, W=W, Ho=Ho, Wo=Wo, KH=kh, KW=kw,
        stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1],
        dil_h=dilation[0], dil_w=dilation[1],
        **dict(zip(("stride_yn", "stride_yc", "stride_yh", "stride_yw"), dy.stride())),
        **dict(zip(("stride_wo", "stride_wc", "stride_wi", "stride_wj"), weight.stride())),
        **dict(zip(("stride_gn", "stride_gc", "stride_gh", "stride_gw"), (dg if dg is not None else dy).stride())),
        **dict(zip(("stride_ar", "stride_ac", "stride_ai", "stride_aj"),
                   (down if down is not None else weight).stride())),
        stride_pp=ps.stride(0), stride_pt=ps.stride(1),
        **dict(zip(("stride_xn", "stride_xc", "stride_xh", "stride_xw"), dx.stride())),
        M_BUCKET=triton.next_power_of_2(max(Nb * H * W, 1)))


def launch_dgrad(dy, weight, dg, down, ps, dx, stride, padding, dilation) -> None:
    upcast, acc_dt, prec = _precision(dy.dtype)
    args = dgrad_args(dy, weight, dg, down, ps, dx, stride, padding, dilation)
    if args["M"] == 0 or args["N"] == 0:
        return
    grid = lambda META: (triton.cdiv(args["M"], META["BLOCK_M"]) * triton.cdiv(args["N"], META["BLOCK_N"]),)  # noqa: E731
    guard = torch.cuda.device(dy.device) if dy.is_cuda else contextlib.nullcontext()
    with guard:
        _conv_dgrad_kernel[grid](**args, PER_SAMPLE_PREF=ps.shape[0] != 1, HAS_ADAPTER=down is not None,
                                 UPCAST=upcast, ACC_DTYPE=acc_dt, INPUT_PRECISION=prec)


def lora_conv2d_dgrad(dy, weight, down, up, pref, x_hw, stride, padding, dilation, scale):
    """(dX, dG) of palora::lora_conv2d_dgrad (palora_kernels._ops checked the arguments).

    dy: (N, C_out, Ho, Wo) any strides; weight (C_out, C_in, kh, kw); down = A_cat (R, C_in, kh, kw);
    up = B_cat (C_out, R); pref (P, T). Returns dX (N, C_in, H, W) and dG = B_cat^T dY (N, R, Ho, Wo),
    dense in dy's memory format.
    """
    C_out, C_in, kh, kw = weight.shape
    R = down.shape[0]
    dx, dg = _ops.lora_conv2d_dgrad_layout(dy, C_in, R, *x_hw)
    if dy.shape[0] == 0:
        return dx, dg
    for what, t in (("weight", weight), ("down", down)):
        _check_int32(what, t.numel())
    ps = scaled_pref(pref, scale, dy.dtype)
    # 1. dG = B_cat^T dY: a 1x1 conv of dY whose weight is B_cat^T (R, C_out, 1, 1), no adapter
    launch_fwd(dy, up.t()[:, :, None, None], None, None, None, ps, dg, None, (1, 1), (0, 0), (1, 1),
               shrink_in_loop=False, expand=False)
    # 2. dX = gatherT([dY | dG * S_n]) @ [W; A_cat]
    launch_dgrad(dy, weight, dg, down, ps, dx, stride, padding, dilation)
    return dx, dg


# ----------------------------------------------------------------------------------------------
# dW and dA
# ----------------------------------------------------------------------------------------------
@triton.jit
def _conv_wgrad_kernel(
    # pointers
    x_ptr,      # (Nb, C_in, H, W)
    dy_ptr,     # (Nb, C_out, Ho, Wo)    read by the first tiles_w row tiles
    dg_ptr,     # (Nb, R, Ho, Wo)        dG, unscaled; read by the others
    ps_ptr,     # (P, T)                 scale * pref
    part_ptr,   # (splits, C_OUT + R, K) fp32 (fp64) partial sums
    # sizes: the GEMM (C_OUT + R, K) with reduction M = Nb*Ho*Wo, split in rows_per_split chunks
    M, C_OUT, R, K, rank, rows_per_split, tiles_w,
    H, W, Ho, Wo, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # strides
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_pp, stride_pt,
    stride_qs, stride_qo, stride_qk,
    # features
    PER_SAMPLE_PREF: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    is_w = pid_o < tiles_w                          # this row tile is dW (reads dY) or dA (reads dG)
    ro = tl.where(is_w, pid_o, pid_o - tiles_w) * BLOCK_O + tl.arange(0, BLOCK_O)   # channel in its source
    mask_w = (ro < C_OUT) & is_w
    mask_a = (ro < R) & (pid_o >= tiles_w)
    col = ro // rank
    # column tile pid_k: tap (i, j) and BLOCK_K input channels (conv2d._tap's order)
    C_in = K // (KH * KW)
    CB = tl.cdiv(C_in, BLOCK_K)
    cc, mask_c, i, j = _tap(pid_k, CB, KW, tl.arange(0, BLOCK_K), C_in, BLOCK_K)
    offs_mb = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=ACC_DTYPE)
    m_start = pid_s.to(tl.int64) * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_mb
        mask_m = offs_m < m_end
        n, ho, wo = _pixels(offs_m, Ho * Wo, Wo)
        # [dY | dG * S_n]^T tile (BLOCK_O, BLOCK_M): dY rows for a dW tile, dG rows scaled for a dA tile
        if is_w:
            a = tl.load(dy_ptr + (ro * stride_yc)[:, None] + (n * stride_yn + ho * stride_yh + wo * stride_yw)[None, :],
                        mask=mask_w[:, None] & mask_m[None, :], other=0.0).to(ACC_DTYPE)
        else:
            g = tl.load(dg_ptr + (ro * stride_gc)[:, None] + (n * stride_gn + ho * stride_gh + wo * stride_gw)[None, :],
                        mask=mask_a[:, None] & mask_m[None, :], other=0.0).to(ACC_DTYPE)
            if PER_SAMPLE_PREF:
                s = tl.load(ps_ptr + n.to(tl.int32)[None, :] * stride_pp + col[:, None] * stride_pt,
                            mask=mask_a[:, None] & mask_m[None, :], other=0.0).to(ACC_DTYPE)
            else:
                s = tl.load(ps_ptr + col * stride_pt, mask=mask_a, other=0.0).to(ACC_DTYPE)[:, None]
            a = g * s
        xt = _x_tile(x_ptr, ho * stride_h - pad_h, wo * stride_w - pad_w, i, j, mask_m, n * stride_xn, cc, mask_c,
                     H, W, dil_h, dil_w, stride_xh, stride_xw, stride_xc)
        acc = _dot(a.to(xt.dtype), xt, acc, UPCAST, INPUT_PRECISION)
    out_row = tl.where(is_w, ro, C_OUT + ro)
    k_col = cc * (KH * KW) + i * KW + j             # the column of weight.view(C_out, -1)
    tl.store(part_ptr + pid_s * stride_qs + (out_row * stride_qo)[:, None] + (k_col * stride_qk)[None, :],
             acc, mask=(mask_w | mask_a)[:, None] & mask_c[None, :])


# one fixed tile per MMA class (the split count depends on it, so it is not autotuned)
# tc: 64x64 with BLOCK_M 64 (4 warps) spilled 2220-2736 bytes, with BLOCK_M 32 480 on sm_90; 8 warps: none.
# tf32 with 4 warps spilled 84 bytes (sm_80); IEEE fp32 32x64x32 spilled 10.8 KB: the fp64 tile
WGRAD_TILE = {"tc": dict(BLOCK_O=64, BLOCK_K=64, BLOCK_M=32, num_warps=8, num_stages=3),
              "tf32": dict(BLOCK_O=64, BLOCK_K=64, BLOCK_M=32, num_warps=8, num_stages=3),
              "fp32": dict(BLOCK_O=32, BLOCK_K=32, BLOCK_M=16, num_warps=4, num_stages=3),
              "fp64": dict(BLOCK_O=32, BLOCK_K=32, BLOCK_M=16, num_warps=4, num_stages=3),
              "interpreter": dict(BLOCK_O=16, BLOCK_K=16, BLOCK_M=32, num_warps=4, num_stages=1)}


def wgrad_plan(M: int, rows_out: int, R: int, K: int, kh_kw: int, tile: dict, sms: int) -> tuple:
    """(tiles_w, tiles_a, tiles_k, splits, rows_per_split) of a wgrad launch. Row splits: ~2 programs
    per SM when the (C_out + R) x K output has few tiles, each split at least 4 row tiles long;
    sms = 0 (the interpreter): up to 2 splits, so the tests cross a split edge."""
    tiles_w, tiles_a = triton.cdiv(rows_out, tile["BLOCK_O"]), triton.cdiv(R, tile["BLOCK_O"])
    tiles_k = kh_kw * triton.cdiv(K // kh_kw, tile["BLOCK_K"])       # tap-major column tiles
    row_tiles = triton.cdiv(M, tile["BLOCK_M"])
    if sms == 0:
        splits = max(1, min(2, row_tiles))
    else:
        splits = max(1, min(triton.cdiv(2 * sms, max((tiles_w + tiles_a) * tiles_k, 1)), triton.cdiv(row_tiles, 4)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), tile["BLOCK_M"]) * tile["BLOCK_M"]
    return tiles_w, tiles_a, tiles_k, triton.cdiv(M, rows_per_split), rows_per_split


def wgrad_args(x, dy, dg, ps, part, kernel_hw, stride, padding, dilation, c_out, rows_per_split, tiles_w) -> dict:
    """The non-constexpr arguments of _conv_wgrad_kernel (kernel_report compiles with these values)."""
    Nb, C_in, H, W = x.shape
    _, _, Ho, Wo = dy.shape
    kh, kw = kernel_hw
    R = dg.shape[1] if dg is not None else 0
    return dict(
        x_ptr=x, dy_ptr=dy, dg_ptr=dg if dg is not None else dy, ps_ptr=ps, part_ptr=part,
        M=Nb * Ho * Wo, C_OUT=c_out, R=R, K=C_in * kh * kw, rank=max(R // ps.shape[1], 1),
        rows_per_split=rows_per_split, tiles_w=tiles_w,
        H=H, W=W, Ho=Ho, Wo=Wo, KH=kh, KW=kw, stride_h=stride[0], stride_w=stride[1],
        pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1],
        **dict(zip(("stride_xn", "stride_xc", "stride_xh", "stride_xw"), x.stride())),
        **dict(zip(("stride_yn", "stride_yc", "stride_yh", "stride_yw"), dy.stride())),
        **dict(zip(("stride_gn", "stride_gc", "stride_gh", "stride_gw"), (dg if dg is not None else dy).stride())),
        stride_pp=ps.stride(0), stride_pt=ps.stride(1),
        stride_qs=part.stride(0), stride_qo=part.stride(1), stride_qk=part.stride(2))


def wgrad_tile(dtype: torch.dtype) -> dict:
    return wgrad_tile_for(mma_class(dtype, _precision(dtype)[2]))


def wgrad_tile_for(mma: str) -> dict:
    return WGRAD_TILE["interpreter" if INTERPRET else mma]


def wgrad(x, dy, dg, ps, kernel_hw, stride, padding, dilation, need_weight: bool) -> torch.Tensor:
    """[dW; dA] flattened, (C_out (or 0) + R, C_in*kh*kw) in the accumulator dtype. dg None: dW only."""
    Nb, C_in = x.shape[:2]
    _, C_out, Ho, Wo = dy.shape
    R = dg.shape[1] if dg is not None else 0
    K, M = C_in * kernel_hw[0] * kernel_hw[1], Nb * Ho * Wo
    co = C_out if need_weight else 0
    upcast, acc_dt, prec = _precision(x.dtype)
    tdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if M == 0 or K == 0 or co + R == 0:
        return torch.zeros((co + R, K), dtype=tdt, device=x.device)
    t = wgrad_tile(x.dtype)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda and not INTERPRET else 0
    tiles_w, tiles_a, tiles_k, splits, rows_per_split = wgrad_plan(M, co, R, K, kernel_hw[0] * kernel_hw[1], t, sms)
    part = torch.empty((splits, co + R, K), dtype=tdt, device=x.device)
    args = wgrad_args(x, dy, dg, ps, part, kernel_hw, stride, padding, dilation, co, rows_per_split, tiles_w)
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        _conv_wgrad_kernel[(tiles_w + tiles_a, tiles_k, splits)](
            **args, PER_SAMPLE_PREF=ps.shape[0] != 1, UPCAST=upcast, ACC_DTYPE=acc_dt, INPUT_PRECISION=prec,
            **t)
    return part.sum(0) if splits > 1 else part[0]       # a fixed-order reduction: deterministic


def lora_conv2d_wgrad(x, dy, dg, pref, kernel_hw, stride, padding, dilation, scale, need_weight):
    """(dW, dA_cat) of palora::lora_conv2d_wgrad (palora_kernels._ops checked the arguments).

    x (N, C_in, H, W), dy (N, C_out, Ho, Wo), dg (N, R, Ho, Wo) with any strides; pref (P, T).
    dW (C_out, C_in, kh, kw), or 0 rows when need_weight is False; dA_cat (R, C_in, kh, kw); contiguous.
    """
    C_out, R = dy.shape[1], dg.shape[1]
    dw, da = _ops.lora_conv2d_wgrad_layout(x, C_out, R, *kernel_hw, need_weight)
    tot = wgrad(x, dy, dg, scaled_pref(pref, scale, x.dtype), kernel_hw, stride, padding, dilation, need_weight)
    co, K = dw.shape[0], tot.shape[1]
    dw.view(co, K).copy_(tot[:co])
    da.view(R, K).copy_(tot[co:])
    return dw, da
