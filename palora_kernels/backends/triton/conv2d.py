"""Triton kernels of palora::lora_conv2d (factorized adapters): an implicit GEMM.

    rows M = N*Ho*Wo (row m: image n = m // (Ho*Wo), pixel ho, wo), K = C_in*kh*kw (the entries of
    weight.view(C_out, -1), visited tap by tap, BLOCK_K channels at a time), columns C_out. The
    im2col tile of x is gathered from x's own strides (NCHW, channels_last or a view) inside the K
    loop, never materialised.

    y = im2col(x) W^T + bias + (H * S_n) B_cat^T        H = im2col(x) A_cat^T   (unscaled)

Two shapes (docs/design.md section 1; the cost model picks, :func:`use_path` forces):
  inloop  _conv_fwd_kernel(SHRINK_IN_LOOP): the x tile already loaded for the base product also feeds
          H's accumulator; the expand is a (BLOCK_M, R) @ (R, BLOCK_N) MMA in the epilogue. One launch.
  split   _conv_fwd_kernel with A_cat as its weight writes H (C_out -> R columns, no adapter), then
          _conv_fwd_kernel starts its accumulator from (H*S) @ B_cat^T and adds the base product.
          Any R (in-loop holds R <= 64 in registers).
The same kernel with no adapter (SHRINK_IN_LOOP = EXPAND = False) is a plain conv: dG = B_cat^T dY
(a 1x1 conv of dY, conv2d_bwd.py) and the base conv of the merged loralib layer (loralib.py).
Per-sample preference: S_n = scale * pref[n] with n = m // (Ho*Wo); per-batch: pref[0].
Outputs y and H are written through their strides, in x's memory format (nn.Conv2d's rule).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from ... import _ops, cost_model
from .linear import (INTERPRET, _cfg, _dot, _precision, _scale_tile, allow_tf32, block_r, grouped_tile,
                     mma_class)


# ----------------------------------------------------------------------------------------------
# configs: one function per GPU family (as linear.py), pruned at launch by _prune
# ----------------------------------------------------------------------------------------------
def conv_configs_for(family: str, mma: str = None):
    """One tile per family and MMA class: kernel_report compiles each for sm_80 and sm_90 (~5 s a
    row on a loaded 2-core machine, so the list stays short). Spills seen there (bf16, 3x3 512->512,
    in-loop, per-sample, channels_last): 128x128x32 w8 s4 spilled 192 bytes on sm_80; 64x64x64 w4
    and 64x128x64 w8 spill nothing on either arch."""
    if family == "interpreter":     # one config (autotuning needs a GPU); tiles still cross the edges
        return [_cfg(32, 32, 16, 4, 1, "interpreter", "any", group_m=2)]
    tc = {"sm_90": _cfg(64, 128, 64, 8, 4, "sm_90"), "sm_80": _cfg(64, 64, 64, 4, 4, "sm_80"),
          "default": _cfg(64, 64, 32, 4, 3, "default")}[family]
    # IEEE fp32 64x64x32 w8 spilled 768-836 bytes (the fp32 im2col tile is twice bf16's): 32x64x16
    fma = [_cfg(64, 64, 32, 8, 3, family, "tf32"), _cfg(32, 64, 16, 4, 3, family, "fp32"),
           _cfg(32, 64, 16, 4, 3, family, "fp64")]
    return [c for c in [tc] + fma if mma is None or c.mma in (mma, "any")]


FAMILIES = ("sm_80", "sm_90", "default", "interpreter")
_ALL_CONFIGS = [c for f in FAMILIES for c in conv_configs_for(f)]


def _prune(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    family = "interpreter" if INTERPRET else cost_model.gpu_family(a["x_ptr"].device)
    mma = mma_class(a["x_ptr"].dtype, a.get("INPUT_PRECISION", "ieee"))
    mine = [c for c in configs if c.family == family and c.mma in (mma, "any")]
    kept = [c for c in mine if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(a["M"]))
            and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(a["N"]))]
    return kept or mine[-1:]


# ----------------------------------------------------------------------------------------------
# shared pieces of the implicit GEMMs (also used by conv2d_bwd.py and loralib.py)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pixels(offs_m, HoWo, Wo):
    """row m -> (image n, ho, wo); offs_m is int64, so are the results."""
    n = offs_m // HoWo
    q = offs_m - n * HoWo
    ho = q // Wo
    return n, ho, q - ho * Wo


@triton.jit
def _tap(t, CB, KW, offs_k, C, BLOCK_K: tl.constexpr):
    """K step t -> (channels cc = c0 + offs_k, their mask cc < C, tap i, tap j). The K loop runs tap-major,
    BLOCK_K channels at a time (CB = cdiv(channels, BLOCK_K) steps per tap), so every index and bounds test is
    per row or per column, never per element: a flattened c*kh*kw + i*kw + j order spilled 24-1112 bytes on
    sm_80/sm_90 (kernel_report) from its (BLOCK_M, BLOCK_K) int64 index tiles."""
    tap = t // CB
    i = tap // KW
    cc = (t - tap * CB) * BLOCK_K + offs_k
    return cc, cc < C, i, tap - i * KW


@triton.jit
def _x_tile(x_ptr, hb, wb, i, j, mask_m, row_off, cc, mask_c, H, W, dil_h, dil_w, stride_xh, stride_xw, stride_xc):
    """(BLOCK_M, BLOCK_K) tile x[n, cc, hb + i*dil_h, wb + j*dil_w] of the implicit GEMM, one row per output pixel;
    zero where the tap falls in the padding."""
    hi = hb + i * dil_h
    wi = wb + j * dil_w
    ok = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    x_row = row_off + hi * stride_xh + wi * stride_xw
    return tl.load(x_ptr + x_row[:, None] + (cc * stride_xc)[None, :], mask=ok[:, None] & mask_c[None, :], other=0.0)


@triton.jit
def _weight_tile(w_ptr, cc, mask_c, i, j, offs_n, mask_n, stride_wo, stride_wc, stride_wi, stride_wj):
    """(BLOCK_K, BLOCK_N) tile W[offs_n, cc, i, j]^T of a (C_out, C_in, kh, kw) weight, any strides."""
    return tl.load(w_ptr + (cc * stride_wc + i * stride_wi + j * stride_wj)[:, None] + offs_n[None, :] * stride_wo,
                   mask=mask_c[:, None] & mask_n[None, :], other=0.0)


# ----------------------------------------------------------------------------------------------
# the forward kernel
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=_ALL_CONFIGS,
                 key=["M_BUCKET", "N", "K", "R", "KH", "KW", "SHRINK_IN_LOOP", "EXPAND", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _conv_fwd_kernel(
    # pointers
    x_ptr,      # (Nb, C_in, H, W)     any strides
    w_ptr,      # (C_out, C_in, kh, kw)
    bias_ptr,   # (C_out,)             read when HAS_BIAS
    down_ptr,   # (R, C_in, kh, kw)    A_cat, read when SHRINK_IN_LOOP
    up_ptr,     # (C_out, R)           B_cat, read when EXPAND
    ps_ptr,     # (P, T)               scale * pref
    out_ptr,    # (Nb, C_out, Ho, Wo)  y
    h_ptr,      # (Nb, R, Ho, Wo)      H: written when SHRINK_IN_LOOP, read when EXPAND (split)
    # sizes: the GEMM (M, N, K) = (Nb*Ho*Wo, C_out, C_in*kh*kw), and the geometry
    M, N, K, R, rank,
    H, W, Ho, Wo, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # strides
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wi, stride_wj,
    stride_dr, stride_dc, stride_di, stride_dj,
    stride_uo, stride_ur,
    stride_pp, stride_pt,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_hn, stride_hc, stride_hh, stride_hw,
    M_BUCKET,   # next_pow2(M): autotune key only
    # features
    HAS_BIAS: tl.constexpr, PER_SAMPLE_PREF: tl.constexpr, SHRINK_IN_LOOP: tl.constexpr,
    EXPAND: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    # tiles
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # int64: N*C*H*W may pass 2^31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    n, ho, wo = _pixels(offs_m, Ho * Wo, Wo)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)

    if EXPAND and not SHRINK_IN_LOOP:
        # split: start from (H * S) @ B_cat^T, R in chunks of BLOCK_R
        h_row = n * stride_hn + ho * stride_hh + wo * stride_hw
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            mask_r = rr < R
            h = tl.load(h_ptr + h_row[:, None] + rr[None, :] * stride_hc,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            g = h.to(ACC_DTYPE) * _scale_tile(ps_ptr, n, rr, mask_m, mask_r, 1, rank, stride_pp, stride_pt,
                                              ACC_DTYPE, PER_SAMPLE_PREF)
            u = tl.load(up_ptr + rr[:, None] * stride_ur + offs_n[None, :] * stride_uo,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = _dot(g.to(u.dtype), u, acc, UPCAST, INPUT_PRECISION)

    row_off = n * stride_xn
    hb = ho * stride_h - pad_h
    wb = wo * stride_w - pad_w
    if SHRINK_IN_LOOP:
        mask_r = offs_r < R
        h_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    C_in = K // (KH * KW)
    CB = tl.cdiv(C_in, BLOCK_K)
    for t in range(0, KH * KW * CB):
        cc, mask_c, i, j = _tap(t, CB, KW, offs_k, C_in, BLOCK_K)
        x = _x_tile(x_ptr, hb, wb, i, j, mask_m, row_off, cc, mask_c, H, W, dil_h, dil_w, stride_xh, stride_xw,
                    stride_xc)
        w = _weight_tile(w_ptr, cc, mask_c, i, j, offs_n, mask_n, stride_wo, stride_wc, stride_wi, stride_wj)
        acc = _dot(x, w, acc, UPCAST, INPUT_PRECISION)
        if SHRINK_IN_LOOP:
            d = _weight_tile(down_ptr, cc, mask_c, i, j, offs_r, mask_r, stride_dr, stride_dc, stride_di, stride_dj)
            h_acc = _dot(x, d, h_acc, UPCAST, INPUT_PRECISION)

    if SHRINK_IN_LOOP:
        if EXPAND:
            g = h_acc * _scale_tile(ps_ptr, n, offs_r, mask_m, mask_r, 1, rank, stride_pp, stride_pt,
                                    ACC_DTYPE, PER_SAMPLE_PREF)
            u = tl.load(up_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_uo,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = _dot(g.to(u.dtype), u, acc, UPCAST, INPUT_PRECISION)
        if pid_n == 0:
            h_row = n * stride_hn + ho * stride_hh + wo * stride_hw
            tl.store(h_ptr + h_row[:, None] + offs_r[None, :] * stride_hc,
                     h_acc.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    o_row = n * stride_on + ho * stride_oh + wo * stride_ow
    tl.store(out_ptr + o_row[:, None] + offs_n[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
_forced_path: Optional[str] = None


@contextlib.contextmanager
def use_path(path: Optional[str]):
    """Force 'inloop' | 'split' for every Triton lora_conv2d in the block (tests, benchmarks)."""
    global _forced_path
    if path not in (None, "inloop", "split"):
        raise ValueError(f"path: expected 'inloop', 'split' or None, got {path!r}")
    prev, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = prev


def pick_path(rows, K, C_out, R, T, dtype, device, bias) -> str:
    """inloop or split by palora_kernels.cost_model on the implicit GEMM (rows, K) x (K, C_out).
    merged is not offered: the op returns H, so a merged conv still needs the shrink pass."""
    if _forced_path is not None:
        if _forced_path == "inloop" and R > cost_model.MAX_INLOOP_R:
            raise ValueError(f"path: 'inloop' supports R <= {cost_model.MAX_INLOOP_R}, got R = {R}")
        return _forced_path
    family = "default" if INTERPRET else cost_model.gpu_family(device)
    return cost_model.choose_path(rows, K, C_out, R, T, dtype, family, per_batch=False, bias=bias,
                                  allow_tf32=allow_tf32(), cublas=False)


def _s4(t: Optional[torch.Tensor], like: torch.Tensor):
    return (t if t is not None else like).stride()


def fwd_args(x, weight, bias, down, up, ps, out, h, stride, padding, dilation) -> dict:
    """The non-constexpr arguments of _conv_fwd_kernel (kernel_report compiles with these values).
    down/up/h may be None (a plain conv); their pointers then alias x and are never read."""
    Nb, C_in, H, W = x.shape
    C_out, _, kh, kw = weight.shape
    _, _, Ho, Wo = out.shape
    R = down.shape[0] if down is not None else 0
    up_s = up.stride() if up is not None else (0, 0)
    return dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else x,
        down_ptr=down if down is not None else x, up_ptr=up if up is not None else x, ps_ptr=ps,
        out_ptr=out, h_ptr=h if h is not None else out,
        M=Nb * Ho * Wo, N=C_out, K=C_in * kh * kw, R=R, rank=max(R // ps.shape[1], 1),
        H=H, W=W, Ho=Ho, Wo=Wo, KH=kh, KW=kw, stride_h=stride[0], stride_w=stride[1],
        pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1],
        **dict(zip(("stride_xn", "stride_xc", "stride_xh", "stride_xw"), x.stride())),
        **dict(zip(("stride_wo", "stride_wc", "stride_wi", "stride_wj"), weight.stride())),
        **dict(zip(("stride_dr", "stride_dc", "stride_di", "stride_dj"), _s4(down, weight))),
        stride_uo=up_s[0], stride_ur=up_s[1], stride_pp=ps.stride(0), stride_pt=ps.stride(1),
        **dict(zip(("stride_on", "stride_oc", "stride_oh", "stride_ow"), out.stride())),
        **dict(zip(("stride_hn", "stride_hc", "stride_hh", "stride_hw"), _s4(h, out))),
        M_BUCKET=triton.next_power_of_2(max(Nb * Ho * Wo, 1)))


def scaled_pref(pref: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """(P, T) scale * pref in the accumulator's dtype (fp64 for fp64 inputs, else fp32); tiny."""
    return pref.to(torch.float64 if dtype == torch.float64 else torch.float32) * scale


def launch_fwd(x, weight, bias, down, up, ps, out, h, stride, padding, dilation, *, shrink_in_loop: bool,
               expand: bool) -> None:
    """One _conv_fwd_kernel launch on x's device (tensors already allocated)."""
    upcast, acc_dt, prec = _precision(x.dtype)
    R = down.shape[0] if down is not None else 0
    args = fwd_args(x, weight, bias, down, up, ps, out, h, stride, padding, dilation)
    if args["M"] == 0 or args["N"] == 0:
        return
    grid = lambda META: (triton.cdiv(args["M"], META["BLOCK_M"]) * triton.cdiv(args["N"], META["BLOCK_N"]),)  # noqa: E731
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        _conv_fwd_kernel[grid](**args, HAS_BIAS=bias is not None, PER_SAMPLE_PREF=ps.shape[0] != 1,
                               SHRINK_IN_LOOP=shrink_in_loop, EXPAND=expand, UPCAST=upcast, ACC_DTYPE=acc_dt,
                               INPUT_PRECISION=prec, BLOCK_R=block_r(max(R, 1)))


def _check_int32(what: str, value: int) -> None:
    # weight-side offsets (c*stride_wc + ...) and the column index are 32-bit; x/y/H rows are int64
    if value >= 2 ** 31:
        raise ValueError(f"{what}: expected fewer than 2^31 elements for the Triton conv kernels, got {value}")


def lora_conv2d(x, weight, down, bias, up, pref, stride, padding, dilation, scale, path: Optional[str] = None):
    """(y, H) of palora::lora_conv2d (see palora_kernels._ops, which checked the arguments).

    x: (N, C_in, H, W) any strides; weight: (C_out, C_in, kh, kw); down = A_cat (R, C_in, kh, kw);
    bias (C_out,) or None; up = B_cat (C_out, R); pref (P, T), P in (1, N).
    Returns y (N, C_out, Ho, Wo) and H (N, R, Ho, Wo), dense in x's memory format.
    """
    C_out, C_in, kh, kw = weight.shape
    R, T = down.shape[0], pref.shape[1]
    Ho = _ops.conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    Wo = _ops.conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    y, h = _ops.lora_conv2d_layout(x, C_out, R, Ho, Wo)
    if y.numel() == 0 and h.numel() == 0:
        return y, h
    for what, t in (("weight", weight), ("down", down)):
        _check_int32(what, t.numel())
    ps = scaled_pref(pref, scale, x.dtype)
    rows, K = x.shape[0] * Ho * Wo, C_in * kh * kw
    path = path or pick_path(rows, K, C_out, R, T, x.dtype, x.device, bias is not None)
    if path == "split":
        # H = im2col(x) A_cat^T: the same kernel with A_cat as its weight and no adapter
        launch_fwd(x, down, None, None, None, ps, h, None, stride, padding, dilation,
                   shrink_in_loop=False, expand=False)
    launch_fwd(x, weight, bias, down, up, ps, y, h, stride, padding, dilation,
               shrink_in_loop=path == "inloop", expand=True)
    return y, h
