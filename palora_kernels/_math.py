"""The math every backend shares (docs/design.md section 1), in one place.

Stacked form: one LoRA of rank R = T*r.

    A_cat = [A_1; ...; A_T]   (R, in)        B_cat = [B_1 ... B_T]   (out, R)
    H = x A_cat^T   (N, R)    G = H * S      S[n, t*r + j] = s * p[n // L, t]
    y = x W^T + b + G B_cat^T

A preference is carried as a 2-D tensor ``pref (P, T)`` plus ``rows_per_sample``
L: row n of the flattened input uses ``pref[n // L]``. A per-batch preference
is ``P == 1`` with ``L == max(N, 1)``, so every backend has one code path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def stack_A(lora_A: torch.Tensor) -> torch.Tensor:
    """lora_A: (T, r, *k) -> A_cat (R, *k), row t*r + j is A_t[j]. A view when possible."""
    T, r = lora_A.shape[:2]
    return lora_A.reshape(T * r, *lora_A.shape[2:])


def stack_B(lora_B: torch.Tensor) -> torch.Tensor:
    """lora_B: (T, out, r) -> B_cat (out, R), column t*r + j is B_t[:, j]."""
    T, out, r = lora_B.shape
    return lora_B.permute(1, 0, 2).reshape(out, T * r)


def unstack_B(d_B_cat: torch.Tensor, T: int) -> torch.Tensor:
    """Inverse of :func:`stack_B` for a gradient: (out, R) -> (T, out, r)."""
    out, R = d_B_cat.shape
    return d_B_cat.reshape(out, T, R // T).permute(1, 0, 2)


def row_scale(pref: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    """pref (P, T) -> S (P, R) with S[p, t*r + j] = scale * pref[p, t]."""
    return (pref * scale).repeat_interleave(rank, dim=1)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype small products and sums are formed in: fp32 for fp16/bf16, else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def apply_row_scale(h: torch.Tensor, pref: torch.Tensor, rows_per_sample: int,
                    rank: int, scale: float) -> torch.Tensor:
    """G = H * S for H (N, R): row n is scaled by S[n // rows_per_sample]. New tensor, H's dtype.

    S and the product in fp32 for fp16/bf16 H, rounded once: S rounded to the dtype first added a
    systematic relative error of ~1 ulp to every adapter gradient."""
    N, R = h.shape
    P = pref.shape[0]
    S = row_scale(pref.to(acc_dtype(h.dtype)), rank, scale)     # (P, R)
    if P == 1:
        return (h * S).to(h.dtype)
    return (h.reshape(P, rows_per_sample, R) * S[:, None, :]).reshape(N, R).to(h.dtype)


def expand_operands(h: torch.Tensor, up: torch.Tensor, pref: torch.Tensor, rows_per_sample: int, rank: int,
                    scale: float):
    """(G, U) with G @ U = (H * S) up, the expand's two operands: one preference for all rows folds S into
    ``up`` (R x M, not N x R); per-sample preferences scale the rows of H (apply_row_scale)."""
    if pref.shape[0] == 1:
        return h, up * row_scale(pref.to(up.dtype), rank, scale).t()
    return apply_row_scale(h, pref, rows_per_sample, rank, scale), up


def row_scaled_tmm(u: torch.Tensor, v: torch.Tensor, pref: torch.Tensor, rows_per_sample: int,
                   rank: int, scale: float, tmm=None) -> torch.Tensor:
    """(U * S)^T V for U (N, R), V (N, K): dA_cat = dH^T x and dB_cat^T = (H * S)^T dY. (R, K), V's dtype.
    The ``lora_tmm`` op; ``tmm(a, b) = a^T b`` is the product (default: torch's GEMM).

    A per-batch S scales the columns of U^T V once, in fp32, after the GEMM: rounding U * S (N x R
    values) before a sum over N rows put 1-3x the same-dtype loop's error into dA and dB in bf16."""
    tmm = tmm or (lambda a, b: a.t() @ b)
    if pref.shape[0] == 1:
        S = row_scale(pref.to(acc_dtype(u.dtype)), rank, scale)[0]              # (R,)
        return (tmm(u, v) * S[:, None]).to(v.dtype)
    return tmm(apply_row_scale(u, pref, rows_per_sample, rank, scale), v)


def pref_grad(h: torch.Tensor, dg: torch.Tensor, pref: torch.Tensor,
              rows_per_sample: int, rank: int, scale: float) -> torch.Tensor:
    """dp[p, t] = scale * sum_{rows n of p} sum_j H[n, t*r+j] * dG[n, t*r+j]  -> (P, T).

    The formula in torch ops (the ``torch`` backend's pref_grad); the ``cpp`` backend's C++ kernel
    makes one pass with no (N, R) product temporary."""
    N, R = h.shape
    P, T = pref.shape
    if N == 0:
        return torch.zeros_like(pref)
    acc = acc_dtype(h.dtype)                         # products and sums in fp32, one rounding at the end
    prod = (h.to(acc) * dg.to(acc)).reshape(P, -1, T, rank)          # (P, L, T, r); L = N // P
    return (prod.sum(dim=(1, 3)) * scale).to(pref.dtype)


def merged_delta(A_cat: torch.Tensor, B_cat: torch.Tensor, pref_vec: torch.Tensor,
                 rank: int, scale: float) -> torch.Tensor:
    """s * B_cat diag(p) A_cat for a per-batch preference p (T,) or (1, T): (out, in). Costs out*in*R."""
    return merged_deltas(A_cat, B_cat, pref_vec.reshape(1, -1), rank, scale)[0]


def loralib_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, weight_shape) -> torch.Tensor:
    """loralib conv adapters (T, r*k, C_in*k) x (T, C_out*k, r*k) -> weight deltas (T, *weight_shape)."""
    return torch.bmm(lora_B, lora_A).view(lora_A.shape[0], *weight_shape)


def merged_deltas(A_cat: torch.Tensor, B_cat: torch.Tensor, pref: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    """s * B_cat diag(p_n) A_cat for each row of pref (P, T): (P, out, in). Costs P*out*in*R."""
    S = row_scale(pref.to(A_cat.dtype), rank, scale)                             # (P, R)
    return torch.matmul(B_cat, S[:, :, None] * A_cat)


def weight_space_grads(dW: torch.Tensor, A_cat: torch.Tensor, B_cat: torch.Tensor,
                       pref: torch.Tensor, rank: int, scale: float, need_A: bool, need_B: bool,
                       need_p: bool):
    """Adapter gradients from the gradients of the effective weights.

    With one preference p_n per group of rows, each group computes y = x W_n^T + b with
    W_n = W + B_cat diag(S_n) A_cat, so dW_n is that group's weight gradient and, with
    M_n = B_cat^T dW_n (R, in):
        dA_cat = sum_n diag(S_n) M_n      dB_cat = sum_n dW_n A_cat^T diag(S_n)
        dp[n, t] = s sum_{j, i} M_n[tr+j, i] A_cat[tr+j, i]
    dW: (P, out, in) or (out, in) for P = 1; A_cat (R, in) and the weights flattened (conv: in =
    C_in*kh*kw); pref (P, T). Costs ~3*P*out*in*R flops, independent of the rows. Returns
    (dA_cat, dB_cat, dp (P, T)), None where not needed.
    """
    dW3 = dW if dW.dim() == 3 else dW[None]
    S = row_scale(pref.to(dW.dtype), rank, scale)                                 # (P, R)
    dA = dB = dp = None
    if need_A or need_p:
        M = torch.matmul(B_cat.t(), dW3)                                         # (P, R, in)
        if need_A:
            dA = (M * S[:, :, None]).sum(0)
        if need_p:
            P = dW3.shape[0]
            dp = ((M * A_cat).sum(-1).view(P, -1, rank).sum(-1) * scale).to(pref.dtype)
    if need_B:
        dB = (torch.matmul(dW3, A_cat.t()) * S[:, None, :]).sum(0)
    return dA, dB, dp


def use_weight_space(rows: int, in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """Whether to run a layer through its effective weights W_n = W + B_cat diag(S_n) A_cat.

    rows: how many rows share one effective weight (all N rows for a per-batch preference, one
    image's Ho*Wo for a per-sample one). Forming W_n and the weight-space gradients cost ~4*in*out*R
    flops per weight, the shrink and expand ~2*rows*R*(in+out): take weights when
    rows >= 2*in*out/(in+out). fp32/fp64 only: in fp16/bf16 the rounded W_n and dW would feed the
    result and the adapter gradients."""
    return (dtype in (torch.float32, torch.float64)
            and rows > 0 and rows * (in_features + out_features) >= 2 * in_features * out_features)


def _adapter_input(x, drop):
    """x, or x under LoRA dropout: drop = (p, seed, offset) regenerates the mask (docs/dropout.md)."""
    if drop is None:
        return x
    from ._rng import dropout_input
    return dropout_input(x, *drop)


def linear_composite(x, weight, lora_A, lora_B, pref, rows_per_sample: int, scale: float, drop=None):
    """x W^T + ((x~ A_cat^T) * S) B_cat^T (no bias) as differentiable torch ops on the stacked form,
    x~ = x, or x under LoRA dropout with drop = (p, seed, offset).

    What the autograd Functions differentiate when a backward must itself be differentiable
    (``create_graph=True``): autograd records it, so every derivative of every order is exact."""
    h = _adapter_input(x, drop) @ stack_A(lora_A).t()
    return x @ weight.t() + apply_row_scale(h, pref, rows_per_sample, lora_A.shape[1], scale) @ stack_B(lora_B).t()


def conv_composite(x, weight, lora_A, lora_B, pref, stride, padding, dilation, scale: float, drop=None):
    """conv(x, W) + B_cat diag(S_n) conv(x~, A_cat) (no bias, factorized adapters) as differentiable
    torch ops; see :func:`linear_composite`. pref (P, T) with P == 1 or P == N."""
    C_out, rank = weight.shape[0], lora_A.shape[1]
    if drop is None:
        z = F.conv2d(x, torch.cat([weight, stack_A(lora_A)]), None, stride, padding, dilation)
        y, h = z[:, :C_out], z[:, C_out:]
    else:   # base and shrink read different inputs
        y = F.conv2d(x, weight, None, stride, padding, dilation)
        h = F.conv2d(_adapter_input(x, drop), stack_A(lora_A), None, stride, padding, dilation)
    S = row_scale(pref.to(h.dtype), rank, scale)[:, :, None, None]               # (P, R, 1, 1)
    return y + torch.einsum("or,nrhw->nohw", stack_B(lora_B), h * S)


def composite_grads(fn, inputs, needs, dy):
    """The gradients of ``fn(*inputs)`` against upstream ``dy``, as a graph (create_graph): the
    backward of an autograd Function whose backward is being differentiated. None where not needed."""
    want = [t for t, n in zip(inputs, needs) if n]
    with torch.enable_grad():
        got = iter(torch.autograd.grad(fn(*inputs), want, dy, create_graph=True, allow_unused=True)) if want else iter(())
    return [next(got) if n else None for n in needs]


def conv_groups_composite(x, weight, bias, lora_A, lora_B, pref, scale, stride, padding, dilation, groups,
                           parameterization, x_lora=None):
    """groups > 1, as differentiable torch ops (every derivative exact): the grouped base conv, then
    factorized: the full-channel adapter (shrink conv over C_in -> R, expand B_cat diag(S_n));
    loralib: the grouped update (B_t A_t).view(W.shape) -- per-batch merged into the one grouped conv,
    per-sample one grouped conv per task (the (T+1)x floor of that parameterisation).
    x_lora: the factorized adapter's input (x under LoRA dropout), default x."""
    rank = lora_A.shape[1]
    if parameterization == "factorized":
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        h = F.conv2d(x if x_lora is None else x_lora, stack_A(lora_A), None, stride, padding, dilation)
        S = row_scale(pref.to(h.dtype), rank, scale)[:, :, None, None]
        return y + torch.einsum("or,nrhw->nohw", stack_B(lora_B), h * S)
    deltas = loralib_delta(lora_A, lora_B, weight.shape)
    p = pref.to(weight.dtype) * scale
    if pref.shape[0] == 1:
        return F.conv2d(x, weight + torch.tensordot(p[0], deltas, dims=1), bias, stride, padding, dilation, groups)
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    for t in range(deltas.shape[0]):
        y = y + p[:, t, None, None, None] * F.conv2d(x, deltas[t], None, stride, padding, dilation, groups)
    return y


# ---------------------------------------------------------------------------------------------
# MTLoRA (docs/design.md section 4; docs/mtlora.md): T + 1 outputs on one base product.
#
# Adapter 0 is the shared (task-agnostic) one, adapter t = 1..T the task-specific ones; output 0 is
# the shared output, output t task t's. Output o is the base plus a stacked adapter whose row of
# scales is one-hot over the adapters that feed o: {0} -> 0, {t} -> t, and with shared_to_tasks
# (MTLoRA's matrixv2) {0, t} -> t. q, k, v of MTLoRAQKV are G = 3 column groups of one op: group g
# has its own rows of W, its own adapters and scales, and the same ranks.
#
#   A_cat (G*R, in), rows [g][a][j]      B_cat (G*Mg, R), row block g, columns [a][j]
#   H = x_a A^T  (N, G*R), columns [g][a][j]; x_a = dropout_g(x), or x_t for a task input
#   Y[o][:, g] = x W_g^T + b_g + sum_{a feeds o} s[g, a] H[:, g, a] B[g, a]^T      Y (T+1, N, G*Mg)
# ---------------------------------------------------------------------------------------------
def mtlora_feeds(o: int, shared_to_tasks: bool) -> tuple:
    """The adapters whose expand is added to output ``o``."""
    return (0,) if o == 0 else ((0, o) if shared_to_tasks else (o,))


def mtlora_offsets(ranks) -> list:
    """Column offset of each adapter inside one group's R = sum(ranks) columns, plus R at the end."""
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    return offs


def mtlora_col_scale(scales: torch.Tensor, ranks) -> torch.Tensor:
    """scales (G, T+1) -> (G*R,): the scale of the adapter owning each column of H."""
    reps = torch.tensor(list(ranks), device=scales.device).repeat(scales.shape[0])
    return scales.reshape(-1).repeat_interleave(reps, output_size=int(reps.sum()))


def mtlora_dropped(x: torch.Tensor, g: int, p: float, seed: int, offset: int) -> torch.Tensor:
    """Group g's dropped input of the adapters that read x: x * m_g / (1 - p), m_g the counter-based
    mask of (seed, offset + g*N*K) (palora_kernels._rng); x itself when p == 0."""
    from ._rng import dropout_input
    return dropout_input(x, p, seed, offset + g * x.numel())


def mtlora_dropout_masks(x: torch.Tensor, groups: int, p: float, seed: int, offset: int):
    """[mtlora_dropped(x, g, ...) for each group]: all G at once (the composite; kernels take one at a time)."""
    return [mtlora_dropped(x, g, p, seed, offset) for g in range(groups)]


def mtlora_composite(x, xs, weight, bias, A, B, ranks, scales, groups: int, shared_to_tasks: bool,
                     p: float = 0.0, seed: int = 0, offset: int = 0):
    """Y (T+1, N, G*Mg) of the MTLoRA op as differentiable torch ops (double backward, zero-size
    inputs): the same math, no fused kernels. Arguments as palora_kernels._ops.mtlora_mm."""
    T = len(ranks) - 1
    R, offs = sum(ranks), mtlora_offsets(ranks)
    Mg = weight.shape[0] // groups
    xd = mtlora_dropout_masks(x, groups, p, seed, offset)
    base = F.linear(x, weight, bias)
    outs = []
    for o in range(T + 1):
        cols = []
        for g in range(groups):
            y = base[:, g * Mg:(g + 1) * Mg]
            for a in mtlora_feeds(o, shared_to_tasks):
                xa = xs[a - 1] if (a > 0 and len(xs)) else xd[g]
                Ag = A[g * R + offs[a]:g * R + offs[a + 1]]
                Bg = B[g * Mg:(g + 1) * Mg, offs[a]:offs[a + 1]]
                y = y + (xa @ Ag.t()) @ Bg.t() * scales[g, a].to(x.dtype)
            cols.append(y)
        outs.append(torch.cat(cols, dim=1))
    return torch.stack(outs)
