"""MTLoRALinear / MTLoRAQKV and the palora::mtlora_mm op (docs/mtlora.md) against an fp64 oracle
that re-implements the MTLoRA reference layer's forward (models/lora.py of scale-lab/MTLoRA)
literally: separate matmuls, one (N, out) tensor per output, autograd for the gradients."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from conftest import TOL, rel_err  # noqa: E402
import palora_kernels as pk  # noqa: E402
from palora_kernels import _ops  # noqa: E402

TASKS = ["seg", "depth", "normals"]


# ------------------------------------------------------------------------------------------------
# the oracle: the reference forward, written out (x_tasks dict or None), dropout given as a mask
# ------------------------------------------------------------------------------------------------
def _scale(s):
    return s if not isinstance(s, torch.Tensor) else s.to(torch.float64)


def oracle_linear(m, x, x_tasks=None, mask=None, p=0.0, cast=lambda t: t):
    """What the reference MTLoRALinear.forward computes, from m's parameters (run it on an fp64 copy)."""
    W, b = cast(m.linear.weight), (cast(m.linear.bias) if m.linear.bias is not None else None)
    pretrained = torch.nn.functional.linear(x, W, b)
    if m.r == 0:
        return pretrained, None
    xd = x if mask is None else x * mask / (1 - p)
    tasks = m.tasks
    def task_out(t):
        xt = xd if x_tasks is None else x_tasks[t]
        return xt @ cast(m.lora_tasks_A[t]).t() @ cast(m.lora_tasks_B[t]).t() * _scale(m.lora_task_scale[t])
    if m.shared_mode in ("matrix", "matrixv2"):
        lora = (xd @ cast(m.lora_shared_A).t() @ cast(m.lora_shared_B).t()) * _scale(m.lora_shared_scale)
        extra = lora if m.shared_mode == "matrixv2" else 0
        lt = {t: pretrained + extra + task_out(t) for t in tasks} if tasks is not None else None
    else:
        lt = {t: pretrained + task_out(t) for t in tasks}
        lora = torch.nn.functional.layer_norm(torch.stack(list(lt.values())).sum(0), m.lora_norm.normalized_shape,
                                              cast(m.lora_norm.weight), cast(m.lora_norm.bias), m.lora_norm.eps)
    return pretrained + lora, lt


def oracle_qkv(m, x, x_tasks=None, masks=(None, None, None), p=0.0):
    """The reference MTLoRAQKV.forward: [q | k | v] of each output (each part with its own dropout mask)."""
    outs = [oracle_linear(s, x, x_tasks, mk, p) for s, mk in zip((m.q, m.k, m.v), masks)]
    lt = {t: torch.cat([o[1][t] for o in outs], -1) for t in m.tasks} if m.tasks else None
    return torch.cat([o[0] for o in outs], -1), lt


def make(mode="matrix", tasks=TASKS, r=None, in_f=13, out_f=11, trainable=False, bias=True, dtype=torch.float64,
         seed=0, dropout=0.0, cls=pk.MTLoRALinear):
    torch.manual_seed(seed)
    r = r if r is not None else {"shared": 5, **{t: 2 + i for i, t in enumerate(tasks or [])}}
    scales = {t: 0.5 + 0.25 * i for i, t in enumerate(tasks or [])}
    m = cls(in_f, out_f, r=r, lora_shared_scale=1.5, lora_task_scale=scales, lora_dropout=dropout, tasks=tasks,
            trainable_scale_shared=trainable, trainable_scale_per_task=trainable, shared_mode=mode, bias=bias,
            dtype=dtype)
    with torch.no_grad():      # B = 0 at init: give the adapters something to do
        for n, prm in m.named_parameters():
            if "lora_" in n and prm.dim() == 2:
                prm.normal_(0, 0.3)
            if "scale" in n:
                prm.add_(0.1)
    return m


def inputs(m_in, tasks, with_tasks, shape=(3, 7), dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, m_in, generator=g).to(dtype)
    xt = {t: torch.randn(*shape, m_in, generator=g).to(dtype) for t in tasks} if with_tasks and tasks else None
    return x, xt


def _flat(y, lt):
    return [y] + ([lt[t] for t in sorted(lt)] if lt is not None else [])


MODES = ["matrix", "matrixv2", "addition", "lora_only"]
