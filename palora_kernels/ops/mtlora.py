"""MTLoRA linear (docs/design.md section 4, docs/mtlora.md): the autograd Function and its
functional entry point, ``mtlora_linear``.

Forward (x: (N, in), task inputs xs: T x (N, in) or none):
    Y, H = mtlora_mm(x, xs, W, b, A_cat, B_cat, ranks, scales)        Y (T+1, N, out), H (N, G*R)
Backward (dY: (T+1, N, out)), the chain rule written once; dYsum_a is the sum of dY_o over the
outputs o that adapter a feeds (dY_0 for the shared adapter, dBase = sum_o dY_o with matrixv2;
dY_t for task t):
    dX, dXs, dBase, dG = mtlora_mm_dgrad(dY, ...)      dG[:, g, a] = dYsum_a B[g, a]  (unscaled)
    dH = dG * s                        dX = dBase W + sum_g drop_g(dH_x A_x),  dX_t = dH_t A_t
    dW = dBase^T x                     db = sum_n dBase
    dA[g, a] = dH[:, g, a]^T x_a       dB[g, a] = s[g, a] dYsum_a^T H[:, g, a]
    ds[g, a] = sum_n,j dG[:, g, a] * H[:, g, a]
dH is never formed: dA = s (dG^T x_a) and dH A = dG (s A) scale the small (G*R, K) factors instead.
x_a is the dropped x of group g (its mask regenerated from (seed, offset + g*N*K), never stored) or
the task input. Saved: x, xs, the parameters, H -- no (N, out) tensor. A frozen base (W and b
without requires_grad, MTLoRA's FREEZE_PRETRAINED) computes no dW, and no dBase unless dX needs it.
With create_graph the backward differentiates _math.mtlora_composite instead (exact higher orders).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import _ops, dispatch
from .._math import composite_grads, mtlora_col_scale, mtlora_composite, mtlora_dropped, mtlora_offsets


class MTLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, conf, x, weight, bias, A, B, scales, *xs):
        ranks, groups, s2t, p, seed, offset, backend = conf
        y, h = _ops.mtlora_mm(x, list(xs), weight, bias, A, B, list(ranks), scales, groups, s2t, p, seed, offset,
                              backend)
        ctx.save_for_backward(x, weight, A, B, scales, h, *xs)
        ctx.conf, ctx.has_bias = conf, bias is not None
        # T+1 outputs, so the backward gets T+1 gradients as they are: returning Y whole and indexing it
        # outside would make autograd stack them into a (T+1, N, out) copy first
        return tuple(y.unbind(0))

    @staticmethod
    def backward(ctx, *dys):
        x, weight, A, B, scales, h, *xs = ctx.saved_tensors
        ranks, groups, s2t, p, seed, offset, backend = ctx.conf
        need_x, need_w, need_b, need_A, need_B, need_s = ctx.needs_input_grad[1:7]
        need_xs = any(ctx.needs_input_grad[7:])
        if torch.is_grad_enabled():      # create_graph: a differentiable backward (module docstring)
            fn = lambda x_, w_, A_, B_, s_, *xs_: mtlora_composite(  # noqa: E731
                x_, list(xs_), w_, None, A_, B_, ranks, s_, groups, s2t, p, seed, offset)
            dy = torch.stack(dys)
            grads = composite_grads(fn, (x, weight, A, B, scales, *xs),
                                    (need_x, need_w, need_A, need_B, need_s) + tuple(ctx.needs_input_grad[7:]), dy)
            db = dy.sum((0, 1)) if need_b and ctx.has_bias else None
            return (None, grads[0], grads[1], db, grads[2], grads[3], grads[4], *grads[5:])
        dys = [d if d.stride(-1) == 1 else d.contiguous() for d in dys]
        T1, (N, M) = len(dys), dys[0].shape
        R, offs = sum(ranks), mtlora_offsets(ranks)
        Mg = M // groups
        need_base = need_w or (need_b and ctx.has_bias)
        dx, dxs, dbase, dg = _ops.mtlora_mm_dgrad(dys, x, list(xs), weight, A, B, list(ranks), scales, groups, s2t,
                                                  p, seed, offset, need_x or need_xs, need_base or (need_B and s2t),
                                                  backend)
        dW = dbase.t() @ x if need_w else None
        db = dbase.sum(0) if need_b and ctx.has_bias else None
        dA = dB = ds = None
        if need_A:           # dA = s dG^T x_a: the (G*R, K) product scaled, no (N, G*R) copy of dG * s
            dA = torch.empty_like(A)
            if not xs and p == 0.0:
                torch.mm(dg.t(), x, out=dA)
            else:
                for g in range(groups):
                    lo = g * R
                    hi = lo + (ranks[0] if xs else R)
                    if hi > lo:      # group g's dropped x, regenerated (one (N, K) copy at a time)
                        torch.mm(dg[:, lo:hi].t(), mtlora_dropped(x, g, p, seed, offset), out=dA[lo:hi])
                    for t in range(1, len(ranks)) if xs else ():
                        if ranks[t]:
                            torch.mm(dg[:, lo + offs[t]:lo + offs[t + 1]].t(), xs[t - 1],
                                     out=dA[lo + offs[t]:lo + offs[t + 1]])
            dA.mul_(mtlora_col_scale(scales, ranks).to(dA.dtype)[:, None])
        if need_B:
            dB = torch.empty_like(B)
            for g in range(groups):
                rows = slice(g * Mg, (g + 1) * Mg)
                for a in range(T1):
                    dsum = (dbase if s2t else dys[0]) if a == 0 else dys[a]
                    cols = slice(g * R + offs[a], g * R + offs[a + 1])
                    dB[rows, offs[a]:offs[a + 1]] = (dsum[:, rows].t() @ h[:, cols]) * scales[g, a].to(B.dtype)
        if need_s:
            ds = _scale_grad(dys, dg, h, x, xs, A, B, ranks, groups, s2t, p, seed, offset).to(scales.dtype)
        dxs_out = list(dxs.unbind(0)) if (need_xs and xs) else [None] * len(xs)
        return (None, dx if need_x else None, dW, db, dA, dB, ds, *dxs_out)


def _scale_grad(dys, dg, h, x, xs, A, B, ranks, groups, s2t, p, seed, offset) -> torch.Tensor:
    """ds (G, T+1) = sum_n,j dG[:, g, a] * H[:, g, a], in fp32 (fp64 for fp64).

    fp16/bf16: H and dG are recomputed in fp32 per adapter (2*N*r*(in + out) flops each, only when a scale
    is trainable). ds sums N*r products that cancel, and the rounded H and dG of the forward and dgrad gave
    up to 30x the same-dtype loop's error in bf16 (tests/test_mtlora.py, trainable scales)."""
    R, offs = sum(ranks), mtlora_offsets(ranks)
    T1, Mg = len(ranks), dys[0].shape[1] // groups
    if dg.dtype in (torch.float32, torch.float64):
        prod = dg.mul(h).sum(0)
        return torch.stack([prod[g * R + offs[a]:g * R + offs[a + 1]].sum()
                            for g in range(groups) for a in range(T1)]).view(groups, T1)
    f = torch.float32
    ds = torch.zeros(groups, T1, dtype=f, device=dg.device)
    xsf = [t.to(f) for t in xs]      # each task input converted once, not once per group
    for g in range(groups):
        rows = slice(g * Mg, (g + 1) * Mg)
        xg = mtlora_dropped(x, g, p, seed, offset).to(f)   # adapters reading x read group g's dropped x
        for a in range(T1):
            if ranks[a] == 0:
                continue
            cols = slice(g * R + offs[a], g * R + offs[a + 1])
            xa = xsf[a - 1] if (a and xs) else xg
            # group g's columns of the output gradient, converted here: every element once over the loops
            dsum = sum(d[:, rows].to(f) for d in dys) if (a == 0 and s2t) else dys[a][:, rows].to(f)
            ds[g, a] = ((xa @ A[cols].to(f).t()) * (dsum @ B[rows, offs[a]:offs[a + 1]].to(f))).sum()
    return ds


def _as_scale(s, like: torch.Tensor) -> torch.Tensor:
    if isinstance(s, torch.Tensor):
        if s.numel() != 1:
            raise ValueError(f"scales: expected numbers or 1-element tensors, got shape {tuple(s.shape)}")
        return s.reshape(()).to(device=like.device)
    return torch.tensor(float(s), device=like.device)


def mtlora_linear(x: torch.Tensor, x_tasks: Optional[Sequence[torch.Tensor]], weights: Sequence[torch.Tensor],
                  biases: Sequence[Optional[torch.Tensor]], lora_A: Sequence[Sequence[torch.Tensor]],
                  lora_B: Sequence[Sequence[torch.Tensor]], scales: Sequence[Sequence], *,
                  shared_to_tasks: bool = False, dropout: float = 0.0, training: bool = True,
                  backend: Optional[str] = None) -> torch.Tensor:
    """The MTLoRA layer's T + 1 outputs on one base product, as one op (docs/mtlora.md).

    x: (..., in). x_tasks: None or T tensors shaped as x (task t's adapter reads x_tasks[t-1]).
    G column groups (1 for MTLoRALinear, 3 for MTLoRAQKV's q, k, v), per group g: weights[g] (Mg, in),
    biases[g] (Mg,) or None, and for adapters a = 0 (shared) .. T: lora_A[g][a] (r_a, in),
    lora_B[g][a] (Mg, r_a), scales[g][a] a number or a 1-element tensor (trainable). A rank-0 adapter
    ((0, in), (Mg, 0)) contributes nothing. Output o = 0 (shared) .. T is
        y_o[..., g] = x W_g^T + b_g + sum_{a feeds o} s[g][a] (x_a A[g][a]^T) B[g][a]^T
    with a feeds o for a == o, and also a == 0 when shared_to_tasks (matrixv2). dropout: the
    adapters' inputs read from x are dropped (counter-based mask per group, regenerated in the
    backward) when training; task inputs are not (as in the MTLoRA reference).
    Returns the T + 1 outputs [y_0 (shared), y_1 .. y_T], each (..., G*Mg): views of one buffer, so
    they cannot be modified in place (torch raises if one is).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"x: expected a floating-point tensor (..., in), got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else (x.dtype, tuple(x.shape))}")
    G = len(weights)
    if G < 1 or not (len(biases) == len(lora_A) == len(lora_B) == len(scales) == G):
        raise ValueError(f"weights, biases, lora_A, lora_B, scales: expected one entry per group, got lengths "
                         f"{len(weights)}, {len(biases)}, {len(lora_A)}, {len(lora_B)}, {len(scales)}")
    T1 = len(lora_A[0])
    ranks = tuple(a.shape[0] for a in lora_A[0])
    in_f = weights[0].shape[1]
    if x.shape[-1] != in_f:
        raise ValueError(f"x: expected x.shape[-1] = {in_f} (in_features), got {x.shape[-1]} (x.shape = {tuple(x.shape)})")
    for g in range(G):
        if len(lora_A[g]) != T1 or len(lora_B[g]) != T1 or len(scales[g]) != T1:
            raise ValueError(f"lora_A[{g}], lora_B[{g}], scales[{g}]: expected {T1} adapters each")
        for a in range(T1):
            if tuple(lora_A[g][a].shape) != (ranks[a], in_f):
                raise ValueError(f"lora_A[{g}][{a}]: expected shape ({ranks[a]}, {in_f}), got {tuple(lora_A[g][a].shape)}")
            if tuple(lora_B[g][a].shape) != (weights[g].shape[0], ranks[a]):
                raise ValueError(f"lora_B[{g}][{a}]: expected shape ({weights[g].shape[0]}, {ranks[a]}), "
                                 f"got {tuple(lora_B[g][a].shape)}")
    xs = list(x_tasks) if x_tasks is not None else []
    if xs and len(xs) != T1 - 1:
        raise ValueError(f"x_tasks: expected {T1 - 1} task inputs (one per task), got {len(xs)}")
    for i, xt in enumerate(xs):
        if not isinstance(xt, torch.Tensor) or xt.shape != x.shape:
            raise ValueError(f"x_tasks[{i}]: expected a tensor of x's shape {tuple(x.shape)}, got "
                             f"{tuple(xt.shape) if isinstance(xt, torch.Tensor) else type(xt).__name__}")
        if xt.dtype != x.dtype or xt.device != x.device:
            raise TypeError(f"x_tasks[{i}]: expected {x.dtype} on {x.device} (x's), got {xt.dtype} on {xt.device}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
    p = float(dropout) if training else 0.0
    weight = weights[0] if G == 1 else torch.cat(list(weights))
    for name, t in (("weight", weight),) + tuple((f"lora_A[{g}][{a}]", lora_A[g][a]) for g in range(G) for a in range(T1)):
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name}: expected {x.dtype} on {x.device} (x's), got {t.dtype} on {t.device}")
    has_bias = biases[0] is not None
    if any((b is not None) != has_bias for b in biases):
        raise ValueError("biases: expected all groups with a bias or none")
    bias = None if not has_bias else (biases[0] if G == 1 else torch.cat(list(biases)))
    A = torch.cat([a for g in range(G) for a in lora_A[g]])
    B = torch.cat([torch.cat(list(lora_B[g]), dim=1) for g in range(G)])
    S = torch.stack([torch.stack([_as_scale(s, x) for s in scales[g]]) for g in range(G)])
    S = S.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    lead = x.shape[:-1]
    N = math.prod(lead)
    x2 = x.reshape(N, in_f)
    xs2 = [xt.reshape(N, in_f) for xt in xs]
    x2, *xs2 = [t if t.stride(-1) == 1 else t.contiguous() for t in [x2] + xs2]
    seed = offset = 0
    if p > 0.0:
        from .._rng import draw_seed_offset
        seed, offset = draw_seed_offset(G * N * in_f)
    name = dispatch.select_backend(x.device, "mtlora_mm", x.dtype, backend)
    if N == 0 or in_f == 0 or weight.shape[0] == 0:   # nothing for a kernel to do: the torch composition
        y = mtlora_composite(x2, xs2, weight, bias, A, B, ranks, S, G, shared_to_tasks, p, seed, offset)
    else:
        ys = MTLoRAFunction.apply((ranks, G, bool(shared_to_tasks), p, seed, offset, name), x2, weight, bias, A, B, S,
                                  *xs2)
        return [t.view(*lead, weight.shape[0]) for t in ys]
    return list(y.reshape(T1, *lead, weight.shape[0]).unbind(0))
