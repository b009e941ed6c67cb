"""The naive loop over adapters: what the PaLoRA reference code and PEFT compute.

It is the oracle of the tests (run it in fp64) and the ``unfused`` provider of the
benchmarks: one (N, out) temporary per adapter, autograd records every op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample_weight(p_t: torch.Tensor, ndim: int) -> torch.Tensor:
    # p_t: (B,) -> (B, 1, ..., 1) broadcastable against a (B, ...) output
    return p_t.reshape(-1, *([1] * (ndim - 1)))


def _weight(preference: torch.Tensor, t: int, ndim: int) -> torch.Tensor:
    if preference.dim() == 1:
        return preference[t]
    return _per_sample_weight(preference[:, t], ndim)


def palora_linear(x, weight, bias, lora_A, lora_B, preference, scale, x_lora=None):
    """y = x W^T + b + s * sum_t p_t (x~ A_t^T) B_t^T,  x~ = x_lora (the adapters' input) or x.

    x: (..., in) or, with a per-sample preference (B, T), (B, ..., in).
    weight: (out, in); bias: (out,) or None; lora_A: (T, r, in); lora_B: (T, out, r).
    x_lora: x's shape; under LoRA dropout, x with the mask applied (as PEFT's lora_dropout(x)).
    """
    x_lora = x if x_lora is None else x_lora
    y = F.linear(x, weight, bias)
    for t in range(lora_A.shape[0]):
        update = F.linear(F.linear(x_lora, lora_A[t]), lora_B[t]) * scale
        y = y + _weight(preference, t, y.dim()) * update
    return y


def delta_weight_loralib(lora_A_t, lora_B_t, weight_shape):
    """The loralib conv update of one task: (B_t @ A_t).view(W.shape)."""
    return (lora_B_t @ lora_A_t).view(weight_shape)


def palora_conv2d(x, weight, bias, lora_A, lora_B, preference, scale,
                  stride=1, padding=0, dilation=1, parameterization="factorized", groups=1, x_lora=None):
    """Conv2d plus the preference-weighted sum of T adapters.

    factorized: lora_A (T, r, C_in, kh, kw) is a conv with the base's stride, padding,
    dilation; lora_B (T, C_out, r) a 1x1 conv.
    loralib: lora_A (T, r*k, C_in*k), lora_B (T, C_out*k, r*k); update (B_t A_t).view(W.shape).
    groups: the base conv's; a factorized adapter stays full-channel, a loralib update is grouped as
    W (lora_B (T, C_out/groups*k, r*k), as in the PaLoRA reference code).
    x_lora: the factorized adapters' input (x under LoRA dropout), default x.
    """
    x_lora = x if x_lora is None else x_lora
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    for t in range(lora_A.shape[0]):
        if parameterization == "factorized":
            h = F.conv2d(x_lora, lora_A[t], None, stride, padding, dilation)
            update = F.conv2d(h, lora_B[t][:, :, None, None])
        else:
            dw = delta_weight_loralib(lora_A[t], lora_B[t], weight.shape)
            update = F.conv2d(x, dw, None, stride, padding, dilation, groups)
        y = y + _weight(preference, t, y.dim()) * (update * scale)
    return y


def mtlora_linear(layer, x, x_tasks=None):
    """What the MTLoRA reference MTLoRALinear.forward computes, as its separate matmuls: the pretrained
    product, the shared LoRA, and per task ``pretrained + x_t A_t^T B_t^T * s_t`` -- one (N, out) tensor
    per output. ``layer``: an MTLoRALinear (its parameters carry the reference's names); dropout is the
    reference's nn.Dropout on x (layer.lora_dropout) when training. The benchmarks' ``reference``."""
    pretrained = layer.linear(x)
    if layer.r == 0:
        return pretrained, None
    x = layer.lora_dropout(x)
    tasks, mode = layer.tasks, layer.shared_mode

    def task_delta(t):
        xt = x if x_tasks is None else x_tasks[t]
        return xt @ layer.lora_tasks_A[t].transpose(0, 1) @ layer.lora_tasks_B[t].transpose(0, 1) * layer.lora_task_scale[t]
    if mode in ("matrix", "matrixv2"):
        lora = (x @ layer.lora_shared_A.transpose(0, 1) @ layer.lora_shared_B.transpose(0, 1)) * layer.lora_shared_scale
        lt = None if tasks is None else {t: pretrained + (lora if mode == "matrixv2" else 0) + task_delta(t) for t in tasks}
    else:
        lt = {t: pretrained + task_delta(t) for t in tasks}
        lora = layer.lora_norm(torch.sum(torch.stack(list(lt.values()), dim=0), dim=0))
    return pretrained + lora, lt


def mtlora_qkv(layer, x, x_tasks=None, once: bool = False):
    """The reference MTLoRAQKV.forward: [q | k | v] of every output. As written there, q, k and v are each
    called 1 + T times (once for the shared output, once more per task); ``once=True`` calls each once.
    Under lora_dropout every call draws its own nn.Dropout mask and autograd keeps, per call, the dropped x
    (for dA) and the fp32 noise tensor (CPU dropout multiplies by it): 2 x (N, in) fp32 per call."""
    parts = (layer.q, layer.k, layer.v)
    if once:
        outs = [mtlora_linear(m, x, x_tasks) for m in parts]
        shared = torch.cat([o[0] for o in outs], dim=-1)
        return shared, ({t: torch.cat([o[1][t] for o in outs], dim=-1) for t in layer.tasks}
                        if layer.tasks is not None else None)
    shared = torch.cat([mtlora_linear(m, x, x_tasks)[0] for m in parts], dim=-1)
    return shared, ({t: torch.cat([mtlora_linear(m, x, x_tasks)[1][t] for m in parts], dim=-1) for t in layer.tasks}
                    if layer.tasks is not None else None)
