"""Losses, the ray-stacked and M-pass PaLoRA steps, the training loop and evaluation.

Linear scalarisation (docs/design.md section 3): the loss of ray m is sum_t lambda_{m,t} L_t with
L_t the mean cross-entropy of task t over the batch; the M ray losses are summed.

Ray-stacked step: the batch x (B, ...) is repeated M times (ray-major: rows [m*B, (m+1)*B)
are copy m) with the per-sample preference rays.repeat_interleave(B); ONE forward and ONE
backward. Since L_{m,t} = mean over copy m, the summed loss is
    sum_n pref[n, t] * l[n, t] / B,
the same scalar as the loop's, and every gradient is the same sum of the same terms.
RayGroupBatchNorm layers are given M groups so each copy is normalised on its own.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import palora_kernels
from palora_kernels.nn import ray_groups


def per_sample_task_losses(logits: list, labels: torch.Tensor) -> torch.Tensor:
    """logits: T tensors (N, C_t); labels: (N, T) -> cross-entropies (N, T)."""
    return torch.stack([F.cross_entropy(lg, labels[:, t], reduction="none") for t, lg in enumerate(logits)], 1)


def _loss_coefs(rays: torch.Tensor, loss_weights: Optional[torch.Tensor], dtype) -> torch.Tensor:
    """The factors of the task losses in the scalarised loss: lambda_t, times w_t if given."""
    c = rays.to(dtype)
    return c if loss_weights is None else c * loss_weights.to(dtype=dtype, device=c.device)


def ray_loss_stacked(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, rays: torch.Tensor,
                     loss_weights: Optional[torch.Tensor] = None):
    """All M rays in one pass. x: (B, ...), labels: (B, T), rays: (M, T).
    loss_weights (T,): extra constant factors on the task losses only (loss balancing); the
    network still runs at ``rays``. Returns (summed scalarised loss, per-ray task losses (M, T)
    detached)."""
    M, T = rays.shape
    B = x.shape[0]
    xs = x.repeat(M, *([1] * (x.dim() - 1)))
    pref = rays.to(x.dtype).repeat_interleave(B, dim=0)                    # (M*B, T)
    with palora_kernels.preference(model, pref), ray_groups(model, M):
        losses = per_sample_task_losses(model(xs), labels.repeat(M, 1))    # (M*B, T)
    task = losses.view(M, B, T).mean(dim=1)                                # (M, T)
    return (_loss_coefs(rays, loss_weights, task.dtype) * task).sum(), task.detach()


def ray_loss_loop(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, rays: torch.Tensor,
                  loss_weights: Optional[torch.Tensor] = None):
    """The PaLoRA reference: one pass per ray, same arguments and return values as
    :func:`ray_loss_stacked`."""
    total, tasks = 0.0, []
    for ray in rays:
        with palora_kernels.preference(model, ray.to(x.dtype)):
            task = per_sample_task_losses(model(x), labels).mean(dim=0)   # (T,)
        total = total + (_loss_coefs(ray, loss_weights, task.dtype) * task).sum()
        tasks.append(task.detach())
    return total, torch.stack(tasks)


def weighted_loss(weights: torch.Tensor, tasks: Optional[list] = None):
    """A plain network's loss: sum_t w_t L_t over the tasks its heads predict (``tasks``: label
    columns of its heads, default all)."""
    def loss_fn(model, x, labels, step):
        y = labels if tasks is None else labels[:, tasks]
        task = per_sample_task_losses(model(x), y).mean(dim=0)
        return (weights.to(task.dtype) * task).sum(), task.detach()[None]
    return loss_fn


class LossBalancer:
    """PaLoRA's loss balancing (LB), the rule of the reference code (nik-dim/palora,
    src/callbacks/methods/palora.py, class PaLoRA_LB): keep the mean task losses of the last
    ``window`` steps; once more than ``window`` steps have been seen, task t's loss is multiplied by
    w_t = 1 - mean_t / sum_k mean_k. Before that w = 1.

    This is a loss-SCALE equaliser, not a catch-up rule: the task with the larger running loss gets
    the SMALLER weight. With 2 tasks w_1 = m_2 / (m_1 + m_2) and w_2 = m_1 / (m_1 + m_2), so both
    weighted losses w_t m_t equal m_1 m_2 / (m_1 + m_2): neither task dominates the sum by the size
    of its loss, and a task that is behind (higher loss) is not pushed harder.
    The weights multiply the losses only, never the preference the network runs at (see
    :func:`palora_loss`). The reference pushes the losses once per ray pass and weights a pass with a
    window that includes it; here the push is once per step (mean over the M rays) and a step is
    weighted with the window of the steps before it."""

    def __init__(self, num_tasks: int, window: int = 25):
        if window < 1:
            raise ValueError(f"window: expected >= 1, got {window}")
        self.window, self.seen = window, 0
        self.costs = torch.ones(window, num_tasks, dtype=torch.float64)
        self.weights = torch.ones(num_tasks, dtype=torch.float64)

    def update(self, task_losses: torch.Tensor) -> torch.Tensor:
        """task_losses (T,) of this step (detached) -> the weights (T,) to use for this step."""
        self.costs = torch.cat([self.costs[1:], task_losses.detach().double().cpu()[None]])
        if self.seen > self.window:
            m = self.costs.mean(0).abs()
            self.weights = 1 - m / m.sum()
        self.seen += 1
        return self.weights


def shared_parameters(model: nn.Module) -> list:
    """The trunk's parameters (everything but the task heads, adapters included): what PaLoRA's
    gradient balancing normalises by (the reference uses its encoder's parameters)."""
    model = getattr(model, "module", model)
    return [p for n, p in model.named_parameters() if not n.startswith("heads.") and p.requires_grad]


def ray_loss_gradient_balanced(model: nn.Module, x, labels, rays, xi: float = 1e-3):
    """PaLoRA's gradient balancing (GB): per ray, sum_t lambda_t L_t / (||grad_shared L_t|| + xi),
    the norms taken as constants (no second-order term), as in the reference. One pass per ray
    plus T gradient evaluations for the norms: about (T + 1)x the cost of a plain step."""
    shared = shared_parameters(model)
    total, tasks = 0.0, []
    for ray in rays:
        with palora_kernels.preference(model, ray.to(x.dtype)):
            task = per_sample_task_losses(model(x), labels).mean(dim=0)   # (T,)
        norms = []
        for t in range(task.shape[0]):
            g = torch.autograd.grad(task[t], shared, retain_graph=True, allow_unused=True)
            norms.append(torch.sqrt(sum((gi.double() ** 2).sum() for gi in g if gi is not None)))
        norms = torch.stack(norms).to(task.dtype)
        total = total + (ray.to(task.dtype) * task / (norms + xi)).sum()
        tasks.append(task.detach())
    return total, torch.stack(tasks)


def palora_loss(sampler, stacked: bool = True, balance: str = "none", num_tasks: Optional[int] = None):
    """The PaLoRA loss of a step: M rays from ``sampler``, linear scalarisation, summed over rays.
    balance: 'none', 'lb' (loss balancing, :class:`LossBalancer`) or 'gb' (gradient balancing,
    :func:`ray_loss_gradient_balanced`; always one pass per ray)."""
    if balance not in ("none", "lb", "gb"):
        raise ValueError(f"balance: expected 'none', 'lb' or 'gb', got {balance!r}")
    step_fn = ray_loss_stacked if stacked else ray_loss_loop
    balancer = None
    if balance == "lb":
        if num_tasks is None:
            raise ValueError("num_tasks: expected the number of tasks with balance='lb', got None")
        balancer = LossBalancer(num_tasks)

    def loss_fn(model, x, labels, step):
        rays = sampler(step, dtype=x.dtype, device=x.device)
        if balance == "gb":
            return ray_loss_gradient_balanced(model, x, labels, rays)
        if balancer is None:
            return step_fn(model, x, labels, rays)
        # LB: the weights multiply the task LOSSES only; the network runs at the unscaled rays, as in
        # the reference (its forward takes the ray, its LB loss is sum_t w_t lambda_t L_t). They come
        # from past steps' losses (constants in this step's graph); this step's are pushed after.
        loss, task = step_fn(model, x, labels, rays, loss_weights=balancer.weights)
        balancer.update(task.mean(0))
        return loss, task
    loss_fn.balancer = balancer
    return loss_fn


# -- PaMaL-style weight ensemble ----------------------------------------------------------------
class WeightEnsemble(nn.Module):
    """PaMaL-style baseline: T full copies of a network (independently initialised), used at
    preference lambda as ONE network with weights sum_t lambda_t theta_t (torch.func.functional_call).
    ``set_ray`` fixes the preference for plain forward calls (evaluation)."""

    def __init__(self, make_net: Callable[[], nn.Module], num_tasks: int):
        super().__init__()
        self.members = nn.ModuleList(make_net() for _ in range(num_tasks))
        self.ray: Optional[torch.Tensor] = None

    def set_ray(self, ray: Optional[torch.Tensor]) -> None:
        self.ray = ray

    def mixed(self, ray: torch.Tensor) -> dict:
        names = [n for n, _ in self.members[0].named_parameters()]
        params = [dict(m.named_parameters()) for m in self.members]
        return {n: sum(ray[t].to(params[t][n].dtype) * params[t][n] for t in range(len(self.members)))
                for n in names}

    def forward(self, x: torch.Tensor):
        if self.ray is None:
            raise ValueError("ray: expected a preference set with set_ray(...) before forward, got None")
        return torch.func.functional_call(self.members[0], self.mixed(self.ray), (x,))


def ensemble_loss(sampler):
    """PaMaL's loss: the M rays of a step, one mixed network per ray, linear scalarisation, summed."""
    def loss_fn(model, x, labels, step):
        model = getattr(model, "module", model)
        rays = sampler(step, dtype=x.dtype, device=x.device)
        total, tasks = 0.0, []
        for ray in rays:
            model.set_ray(ray)
            task = per_sample_task_losses(model(x), labels).mean(dim=0)
            total = total + (ray * task).sum()
            tasks.append(task.detach())
        model.set_ray(None)
        return total, torch.stack(tasks)
    return loss_fn


# -- distribution ----------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def shard(idx: torch.Tensor, dist: Dist) -> torch.Tensor:
    """This rank's contiguous share of a global batch of indices (equal shares)."""
    b = idx.shape[0] // dist.world
    return idx[dist.rank * b:(dist.rank + 1) * b]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size          # drop_last: every step sees a full global batch


# -- training loop ---------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int
    seconds: float
    images_per_s: float
    last_loss: float
    history: list


def param_groups(model: nn.Module, lr: float, adapter_lr_mult: float = 1.0, split: bool = False):
    """Adam parameter groups: the adapters (lora_A, lora_B) at lr * adapter_lr_mult, the rest at lr
    (the reference's ``reweight_lr`` gives adapters lr * T). One group when the multiplier is 1 and
    ``split`` is False."""
    if adapter_lr_mult == 1.0 and not split:
        return [{"params": list(model.parameters())}]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    rest = [p for n, p in model.named_parameters() if "lora_" not in n]
    return [{"params": rest}, {"params": lora, "lr": lr * adapter_lr_mult}]


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn: Callable, *,
          epochs: int, batch_size: int, lr: float, seed: int, dist: Dist = Dist(),
          max_steps: Optional[int] = None, progress: bool = True, desc: str = "train",
          backend: Optional[str] = None, log_every: int = 10, adapter_lr_mult: float = 1.0,
          adapter_lr_scale: Optional[Callable[[int], float]] = None,
          on_epoch_end: Optional[Callable[[int, int], None]] = None) -> TrainResult:
    """Adam on ``loss_fn(model, x, labels, step) -> (loss, per-ray task losses)``.

    Trains ``max_steps`` steps when given (as many epochs as that takes), else ``epochs`` epochs.
    The global batch ``batch_size`` is split evenly over ``dist.world`` ranks; the epoch order is
    a permutation drawn from (seed, epoch), identical on every rank, so 1 process and N
    processes see the same global batches. ``model`` may be wrapped in DDP.
    ``on_epoch_end(epoch, step)`` is called after every full epoch (and after the last step).
    ``adapter_lr_scale(step)``, when given, multiplies the adapters' lr (lr * adapter_lr_mult) at
    each step (the other parameters keep lr).
    """
    if batch_size % dist.world:
        raise ValueError(f"batch_size: expected a multiple of the world size {dist.world}, got {batch_size}")
    n = images.shape[0]
    spe = steps_per_epoch(n, batch_size)
    if spe == 0:
        raise ValueError(f"batch_size: expected <= the training set size {n}, got {batch_size}")
    total = epochs * spe if max_steps is None else max_steps
    epochs = -(-total // spe)
    opt = torch.optim.Adam(param_groups(model, lr, adapter_lr_mult, split=adapter_lr_scale is not None), lr=lr)
    model.train()
    bar = None
    if progress and dist.main:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True)
    step, history, loss_val = 0, [], float("nan")
    t0 = time.perf_counter()
    with palora_kernels.use_backend(backend):
        for epoch in range(epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
            for s in range(spe):
                if step >= total:
                    break
                idx = shard(order[s * batch_size:(s + 1) * batch_size], dist)
                x, y = images[idx].to(dist.device), labels[idx].to(dist.device)
                if adapter_lr_scale is not None:
                    opt.param_groups[1]["lr"] = lr * adapter_lr_mult * adapter_lr_scale(step)
                loss, task = loss_fn(model, x, y, step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step % log_every == 0 or step == total:
                    loss_val = float(loss.detach())
                    history.append({"step": step, "loss": loss_val, "task_losses": task.mean(0).tolist()})
                    if bar is not None:
                        rate = step * batch_size / (time.perf_counter() - t0)
                        bar.set_postfix(loss=f"{loss_val:.4f}", img_s=f"{rate:.0f}", refresh=False)
                if bar is not None:
                    bar.update(1)
            if on_epoch_end is not None:
                on_epoch_end(epoch, step)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return TrainResult(step, seconds, step * batch_size / max(seconds, 1e-9), loss_val, history)


# -- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ray: Optional[torch.Tensor] = None,
             batch_size: int = 1000, device=torch.device("cpu")) -> dict:
    """Per-task accuracy and mean cross-entropy of ``model`` (at preference ``ray`` (T,) when
    given) over a data set; ``labels`` columns must match the model's heads."""
    model.eval()
    n, T = labels.shape
    loss_sum = torch.zeros(T, dtype=torch.float64)
    correct = torch.zeros(T, dtype=torch.float64)
    if ray is None:
        ctx = contextlib.nullcontext()
    elif hasattr(model, "set_ray"):          # WeightEnsemble
        ctx = _ray_set(model, ray.to(device))
    else:
        ctx = palora_kernels.preference(model, ray.to(device))
    with ctx:
        for i in range(0, n, batch_size):
            x, y = images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
            logits = model(x)
            loss_sum += per_sample_task_losses(logits, y).sum(0).double().cpu()
            correct += torch.stack([(lg.argmax(1) == y[:, t]).sum() for t, lg in enumerate(logits)]).double().cpu()
    model.train()
    return {"accuracy": (correct / n).tolist(), "loss": (loss_sum / n).tolist()}


@contextlib.contextmanager
def _ray_set(model, ray):
    model.set_ray(ray)
    try:
        yield model
    finally:
        model.set_ray(None)


def loss_reference_point(classes) -> list:
    """Hypervolume reference for losses: ln(C_t), the cross-entropy of a uniform prediction."""
    return [math.log(c) for c in classes]
