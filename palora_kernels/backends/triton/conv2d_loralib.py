"""The loralib conv layer (the PaLoRA reference's parameterisation) on the Triton conv kernels.

The update of task t is the full weight-shaped D_t = (B_t A_t).view(W.shape) (_math.loralib_delta:
T*C_out*K*r*k flops, once per call), so the adapters are not low rank in channel space.
FLOPs of one call, with M = N*Ho*Wo rows and K = C_in*kh*kw:
  per-batch p:  merge W_eff = W + s sum_t p_t D_t (T*C_out*K), then ONE plain conv, 2*M*K*C_out
                (conv2d._conv_fwd_kernel with no adapter); its backward is the Triton dX kernel and
                the dW kernel on W_eff (2*M*K*C_out each), autograd carries dW_eff to W, A, B, p.
  per-sample p: _loralib_fwd_kernel: each x tile is loaded once and multiplies W and the T deltas,
                scaled per row by s*p[n, t] before the MMA: (T+1)*2*M*K*C_out, the floor of this
                parameterisation (each sample has its own weight), with no (N, C_out, Ho, Wo)
                temporary per task. Backward: the torch composition (the backend torch's one conv
                over [W; D_1..D_T] and a per-image mix), recomputed under autograd.
Double backward (create_graph) differentiates the torch composition in both cases.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..._math import loralib_delta
from ..._ops import conv_memory_format, conv_out_size
from ..torch.kernels import loralib_conv2d as torch_loralib
from .conv2d import (_ALL_CONFIGS, _pixels, _prune, _tap, _weight_tile, _x_tile, launch_fwd, scaled_pref)
from .conv2d_bwd import launch_dgrad, wgrad
from .linear import _dot, _precision, grouped_tile


@triton.autotune(configs=_ALL_CONFIGS, key=["M_BUCKET", "N", "K", "T", "KH", "KW", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _loralib_fwd_kernel(
    x_ptr,      # (Nb, C_in, H, W)
    w_ptr,      # (C_out, C_in, kh, kw)
    bias_ptr,   # (C_out,)               read when HAS_BIAS
    d_ptr,      # (T, C_out, C_in, kh, kw) the deltas D_t
    ps_ptr,     # (Nb, T)                scale * pref, one row per image
    out_ptr,    # (Nb, C_out, Ho, Wo)
    M, N, K, T,
    H, W, Ho, Wo, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wi, stride_wj,
    stride_dt, stride_do, stride_dc, stride_di, stride_dj,
    stride_pp, stride_pt,
    stride_on, stride_oc, stride_oh, stride_ow,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    n, ho, wo = _pixels(offs_m, Ho * Wo, Wo)
    row_off = n * stride_xn
    hb = ho * stride_h - pad_h
    wb = wo * stride_w - pad_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    C_in = K // (KH * KW)
    CB = tl.cdiv(C_in, BLOCK_K)
    for it in range(0, KH * KW * CB):
        cc, mask_c, i, j = _tap(it, CB, KW, offs_k, C_in, BLOCK_K)
        x = _x_tile(x_ptr, hb, wb, i, j, mask_m, row_off, cc, mask_c, H, W, dil_h, dil_w, stride_xh, stride_xw,
                    stride_xc)
        w = _weight_tile(w_ptr, cc, mask_c, i, j, offs_n, mask_n, stride_wo, stride_wc, stride_wi, stride_wj)
        acc = _dot(x, w, acc, UPCAST, INPUT_PRECISION)
        for t in range(0, T):
            # row m's own weight W + sum_t c[n, t] D_t: scale the x tile per row, one MMA per task
            c = tl.load(ps_ptr + n * stride_pp + t * stride_pt, mask=mask_m, other=0.0).to(ACC_DTYPE)
            xs = (x.to(ACC_DTYPE) * c[:, None]).to(x.dtype)
            d = _weight_tile(d_ptr + t * stride_dt, cc, mask_c, i, j, offs_n, mask_n, stride_do, stride_dc,
                             stride_di, stride_dj)
            acc = _dot(xs, d, acc, UPCAST, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    o_row = n * stride_on + ho * stride_oh + wo * stride_ow
    tl.store(out_ptr + o_row[:, None] + offs_n[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def loralib_args(x, weight, bias, deltas, ps, out, stride, padding, dilation) -> dict:
    """The non-constexpr arguments of _loralib_fwd_kernel."""
    Nb, C_in, H, W = x.shape
    C_out, _, kh, kw = weight.shape
    Ho, Wo = out.shape[2:]
    return dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else x, d_ptr=deltas, ps_ptr=ps, out_ptr=out,
        M=Nb * Ho * Wo, N=C_out, K=C_in * kh * kw, T=deltas.shape[0],
        H=H, W=W, Ho=Ho, Wo=Wo, KH=kh, KW=kw, stride_h=stride[0], stride_w=stride[1],
        pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1],
        **dict(zip(("stride_xn", "stride_xc", "stride_xh", "stride_xw"), x.stride())),
        **dict(zip(("stride_wo", "stride_wc", "stride_wi", "stride_wj"), weight.stride())),
        **dict(zip(("stride_dt", "stride_do", "stride_dc", "stride_di", "stride_dj"), deltas.stride())),
        stride_pp=ps.stride(0), stride_pt=ps.stride(1),
        **dict(zip(("stride_on", "stride_oc", "stride_oh", "stride_ow"), out.stride())),
        M_BUCKET=triton.next_power_of_2(max(Nb * Ho * Wo, 1)))


def _out(x, C_out, kh, kw, stride, padding, dilation):
    Ho = conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    Wo = conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return torch.empty((x.shape[0], C_out, Ho, Wo), dtype=x.dtype, device=x.device,
                       memory_format=conv_memory_format(x))


def _composite_grads(ctx, fn, inputs, dy):
    """Gradients of fn(*inputs) (torch ops) for the inputs that need them; a graph under create_graph."""
    needs = ctx.needs_input_grad[:len(inputs)]
    want = [t for t, nd in zip(inputs, needs) if nd]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(nd) if isinstance(t, torch.Tensor) else t for t, nd in zip(inputs, needs)]
        got = torch.autograd.grad(fn(*leaves), [l for l, nd in zip(leaves, needs) if nd], dy,
                                  create_graph=torch.is_grad_enabled(), allow_unused=True) if want else ()
    got = iter(got)
    return [next(got) if nd else None for nd in needs]


class _PlainConv(torch.autograd.Function):
    """y = conv(x, w) + b on the Triton kernels; backward: the Triton dX and dW kernels."""

    @staticmethod
    def forward(ctx, x, w, bias, stride, padding, dilation):
        y = _out(x, w.shape[0], w.shape[2], w.shape[3], stride, padding, dilation)
        ps = x.new_zeros((1, 1), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        launch_fwd(x, w, bias, None, None, ps, y, None, stride, padding, dilation, shrink_in_loop=False, expand=False)
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conf
        if torch.is_grad_enabled():      # create_graph: differentiate F.conv2d instead
            dx, dw = _composite_grads(ctx, lambda a, b: F.conv2d(a, b, None, stride, padding, dilation), (x, w), dy)
        else:
            dx = dw = None
            ps = x.new_zeros((1, 1), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
            if ctx.needs_input_grad[0]:
                dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=conv_memory_format(dy))
                launch_dgrad(dy, w, None, None, ps, dx, stride, padding, dilation)
            if ctx.needs_input_grad[1]:
                dw = wgrad(x, dy, None, ps, list(w.shape[2:]), stride, padding, dilation, True)
                dw = dw.to(w.dtype).view(w.shape)
        db = dy.sum((0, 2, 3)) if has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None


class _PerSampleLoralib(torch.autograd.Function):
    """y = conv(x_n, W + sum_t c[n, t] D_t) + b in one kernel; backward: the torch composition."""

    @staticmethod
    def forward(ctx, x, weight, bias, deltas, coef, stride, padding, dilation):
        y = _out(x, weight.shape[0], weight.shape[2], weight.shape[3], stride, padding, dilation)
        if y.numel():
            upcast, acc_dt, prec = _precision(x.dtype)
            args = loralib_args(x, weight, bias, deltas, coef, y, stride, padding, dilation)
            grid = lambda META: (triton.cdiv(args["M"], META["BLOCK_M"]) * triton.cdiv(args["N"], META["BLOCK_N"]),)  # noqa: E731
            guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
            with guard:
                _loralib_fwd_kernel[grid](**args, HAS_BIAS=bias is not None, UPCAST=upcast, ACC_DTYPE=acc_dt,
                                          INPUT_PRECISION=prec)
        ctx.save_for_backward(x, weight, bias, deltas, coef)
        ctx.conf = (stride, padding, dilation)
        return y

    @staticmethod
    def backward(ctx, dy):
        stride, padding, dilation = ctx.conf
        x, weight, bias, deltas, coef = ctx.saved_tensors

        def fn(x, weight, bias, deltas, coef):
            # the backend torch's composition: one conv over [W; D_1..D_T], then a per-image mix
            T, C_out = deltas.shape[0], weight.shape[0]
            z = F.conv2d(x, torch.cat([weight[None], deltas]).flatten(0, 1), None, stride, padding, dilation)
            N, _, Ho, Wo = z.shape
            c = torch.cat([coef.new_ones(N, 1), coef], 1).to(z.dtype)
            y = torch.bmm(c[:, None, :], z.reshape(N, T + 1, C_out * Ho * Wo)).view(N, C_out, Ho, Wo)
            return y if bias is None else y + bias.view(1, -1, 1, 1)
        return (*_composite_grads(ctx, fn, (x, weight, bias, deltas, coef), dy), None, None, None)


def loralib_conv2d(x, weight, bias, lora_A, lora_B, preference, scale, stride, padding, dilation,
                   parameterization="loralib"):
    """The loralib PaLoRAConv2d layer as a differentiable call (a "composite" op of the triton record).

    x (N, C_in, H, W); weight (C_out, C_in, k, k); lora_A (T, r*k, C_in*k); lora_B (T, C_out*k, r*k);
    preference (T,) (merge once, one plain conv) or (N, T) (one kernel, (T+1)x the base flops).
    """
    deltas = loralib_delta(lora_A, lora_B, weight.shape)                # (T, C_out, C_in, k, k)
    if preference.dim() == 1:
        w_eff = weight + torch.tensordot(preference.to(weight.dtype) * scale, deltas, dims=1)
        return _PlainConv.apply(x, w_eff, bias, list(stride), list(padding), list(dilation))
    if x.shape[0] == 0:
        return torch_loralib(x, weight, bias, lora_A, lora_B, preference, scale, stride, padding, dilation)
    coef = scaled_pref(preference, 1.0, x.dtype) * scale                # (N, T), fp32 (fp64)
    return _PerSampleLoralib.apply(x, weight, bias, deltas, coef, list(stride), list(padding), list(dilation))
