"""The math every backend shares (DESIGN.md section 1), in one place.

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


def apply_row_scale(h: torch.Tensor, pref: torch.Tensor, rows_per_sample: int,
                    rank: int, scale: float) -> torch.Tensor:
    """G = H * S for H (N, R): row n is scaled by S[n // rows_per_sample]. New tensor."""
    N, R = h.shape
    P = pref.shape[0]
    S = row_scale(pref.to(h.dtype), rank, scale)                # (P, R)
    if P == 1:
        return h * S
    return (h.reshape(P, rows_per_sample, R) * S[:, None, :]).reshape(N, R)


def pref_grad(h: torch.Tensor, dg: torch.Tensor, pref: torch.Tensor,
              rows_per_sample: int, rank: int, scale: float) -> torch.Tensor:
    """dp[p, t] = scale * sum_{rows n of p} sum_j H[n, t*r+j] * dG[n, t*r+j]  -> (P, T).

    The C++ kernel (palora::pref_grad, one pass, no (N, R) temporary) runs when built."""
    N, R = h.shape
    P, T = pref.shape
    if N == 0:
        return torch.zeros_like(pref)
    if h.device.type == "cpu" and hasattr(torch.ops.palora, "pref_grad"):
        return torch.ops.palora.pref_grad(h, dg, pref, rows_per_sample, rank, scale)
    prod = (h * dg).reshape(P, -1, T, rank)          # (P, L, T, r); L = N // P
    return (prod.sum(dim=(1, 3)) * scale).to(pref.dtype)


def merged_delta(A_cat: torch.Tensor, B_cat: torch.Tensor, pref_vec: torch.Tensor,
                 rank: int, scale: float) -> torch.Tensor:
    """s * B_cat diag(p) A_cat for a per-batch preference p (T,): (out, in). Costs out*in*R."""
    S = row_scale(pref_vec.reshape(1, -1).to(A_cat.dtype), rank, scale)[0]   # (R,)
    return (B_cat * S) @ A_cat


def weight_space_grads(dW: torch.Tensor, A_cat: torch.Tensor, B_cat: torch.Tensor,
                       pref_vec: torch.Tensor, rank: int, scale: float, need_A: bool, need_B: bool,
                       need_p: bool):
    """Adapter gradients of a per-batch preference from the base weight gradient.

    With one p for the batch the layer is y = x W_eff^T + b, W_eff = W + B_cat diag(S) A_cat, so
    dW_eff = dW and, with M = B_cat^T dW (R, in):
        dA_cat = diag(S) M      dB_cat = dW A_cat^T diag(S)      dp_t = s sum_{j, i} M[tr+j, i] A_cat[tr+j, i]
    dW (out, in) and A_cat (R, in) are flattened (conv: in = C_in*kh*kw). Costs ~3*out*in*R flops,
    independent of the number of rows N. Returns (dA_cat, dB_cat, dp (1, T)), None where not needed.
    """
    S = row_scale(pref_vec.reshape(1, -1).to(dW.dtype), rank, scale)[0]          # (R,)
    dA = dB = dp = None
    if need_A or need_p:
        M = B_cat.t() @ dW                                                       # (R, in)
        if need_A:
            dA = M * S[:, None]
        if need_p:
            dp = ((M * A_cat).sum(1).view(-1, rank).sum(1) * scale).reshape(1, -1).to(pref_vec.dtype)
    if need_B:
        dB = (dW @ A_cat.t()) * S
    return dA, dB, dp


def use_weight_space(rows: int, in_features: int, out_features: int, dtype: torch.dtype,
                     per_batch: bool) -> bool:
    """The weight-space backward (weight_space_grads) costs ~4*in*out*R flops, the row-space one
    ~2*N*R*(in+out): pick the first when N >= 2*in*out/(in+out). fp32/fp64 only: in fp16/bf16 the
    rounded dW would feed the adapter gradients."""
    return (per_batch and dtype in (torch.float32, torch.float64)
            and rows * (in_features + out_features) >= 2 * in_features * out_features)
