"""Test helpers shared by the foundation tests: layers with non-trivial adapters, the fp64
reference of a layer's forward and gradients, and parameter snapshots.

Adapters are re-drawn at random (lora_B is zero at init, which would hide every adapter
bug) and scaled so the adapter term is of the same order as the base term.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from palora_kernels import PaLoRAConv2d, PaLoRALinear, reference


def randomize_(layer, seed: int = 0):
    """Fill weight, bias, lora_A, lora_B with N(0, 1)-ish values in the layer's dtype."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)
    return layer


def make_linear(in_f, out_f, T, r, bias=True, lora_alpha=1.0, dtype=torch.float32, seed=0):
    return randomize_(PaLoRALinear(in_f, out_f, bias, num_tasks=T, rank=r, lora_alpha=lora_alpha,
                                   dtype=dtype), seed)


def make_conv(c_in, c_out, k, T, r, stride=1, padding=0, dilation=1, bias=True, lora_alpha=1.0,
              parameterization="factorized", dtype=torch.float32, seed=0, groups=1):
    return randomize_(PaLoRAConv2d(c_in, c_out, k, stride, padding, dilation, groups, bias=bias, num_tasks=T,
                                   rank=r, lora_alpha=lora_alpha, parameterization=parameterization,
                                   dtype=dtype), seed)


def param_names(layer):
    return [n for n in ("weight", "bias", "lora_A", "lora_B") if getattr(layer, n) is not None]


def _leaves(layer, dtype):
    out = {}
    for n in param_names(layer):
        p = getattr(layer, n).detach()
        out[n] = (p if dtype is None else p.to(dtype)).clone().requires_grad_(True)
    return out


def _backward(y, leaves, xb, pb, dy_seed):
    g = torch.Generator().manual_seed(dy_seed)
    # bf16-representable values: the same upstream gradient whatever dtype y has
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(torch.bfloat16).to(y.dtype)
    y.backward(dy)
    grads = {n: t.grad for n, t in leaves.items()}
    grads["x"] = xb.grad
    grads["preference"] = pb.grad
    return grads


def fused_with_grads(layer, x_base, view, pref_base, pref_view, dy_seed=1):
    """The layer's own forward (whatever backend is active) on ``view(x_base)`` and
    ``pref_view(pref_base)``; returns (y, grads of x_base, the preference leaf and every
    parameter). The views let non-contiguous layouts reach the op."""
    layer.zero_grad(set_to_none=True)
    xb = x_base.detach().clone().requires_grad_(True)
    pb = pref_base.detach().clone().requires_grad_(True)
    y = layer(view(xb), pref_view(pb))
    leaves = {n: getattr(layer, n) for n in param_names(layer)}
    return y, _backward(y, leaves, xb, pb, dy_seed)


def reference_with_grads(layer, x_base, view, pref_base, pref_view, dy_seed=1, dtype=torch.float64):
    """The same as :func:`fused_with_grads` through the reference loop, on copies of every
    leaf cast to ``dtype`` (fp64: the oracle; a low dtype: the same-dtype composition)."""
    leaves = _leaves(layer, dtype)
    xb = x_base.detach().to(dtype).clone().requires_grad_(True)
    pb = pref_base.detach().to(dtype).clone().requires_grad_(True)
    hyper = {k: getattr(layer, k) for k in ("scaling", "stride", "padding", "dilation", "parameterization", "groups")
             if hasattr(layer, k)}
    shadow = SimpleNamespace(**{"bias": None, **hyper, **leaves})   # hyper-parameters + cast leaves
    y = _reference(layer, shadow, view(xb), pref_view(pb))
    return y, _backward(y, leaves, xb, pb, dy_seed)


def _reference(layer, p, x, pref):
    if isinstance(layer, PaLoRALinear):
        return reference.palora_linear(x, p.weight, p.bias, p.lora_A, p.lora_B, pref, p.scaling)
    return reference.palora_conv2d(x, p.weight, p.bias, p.lora_A, p.lora_B, pref, p.scaling, p.stride,
                                   p.padding, p.dilation, p.parameterization, groups=p.groups)


def snapshot(module):
    """Every parameter and buffer, cloned (compare with :func:`assert_unchanged`)."""
    return {n: t.detach().clone() for n, t in list(module.named_parameters()) + list(module.named_buffers())}


def assert_unchanged(module, snap):
    now = dict(list(module.named_parameters()) + list(module.named_buffers()))
    assert now.keys() == snap.keys(), f"parameters changed: {sorted(now)} != {sorted(snap)}"
    for n, t in snap.items():
        assert torch.equal(now[n].detach(), t), f"{n} changed"


def graph_has(t: torch.Tensor, name_prefix: str) -> bool:
    """Whether ``t``'s autograd graph contains a node whose name starts with ``name_prefix``
    (proves which path ran: the hand-written Function or the reference loop)."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn.name().startswith(name_prefix):
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False
