"""Throughput and memory of one PaLoRA training step: fused layers vs the reference loop layers.

Configurations (impl x ray passes), all on copies of the same model and batch:
  fused/stacked    the library's kernels, M rays in one pass (what train_multidigits.py does)
  unfused/stacked  palora_kernels backend "reference" (loop over adapters), M rays in one pass
  unfused/loop     the reference loop layers, one pass per ray: the PaLoRA reference code
  fused/loop       the library's kernels, one pass per ray
Throughput: rounds of ``steps`` timed steps per configuration, the configurations interleaved
within each round (so load from other processes hits all of them alike); median over rounds.
Memory: bytes saved for backward per step (every tensor autograd keeps, parameters excluded,
each storage counted once), exact and device-independent; on CUDA also
torch.cuda.max_memory_allocated of one step; on CPU the peak RSS growth of one step run in
a fresh process (:func:`rss_growth`).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

import palora_kernels
from .training import ray_loss_loop, ray_loss_stacked

CONFIGS = (("fused", "stacked"), ("unfused", "stacked"), ("unfused", "loop"), ("fused", "loop"))


def _backend(impl: str, fused_backend):
    return "reference" if impl == "unfused" else fused_backend


def _step(model, opt, x, y, rays, passes):
    fn = ray_loss_stacked if passes == "stacked" else ray_loss_loop
    loss, _ = fn(model, x, y, rays)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def saved_bytes(model, x, y, rays, impl, passes, fused_backend=None) -> int:
    """Bytes autograd saves for backward in one forward (parameters excluded, storages once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
        return t

    fn = ray_loss_stacked if passes == "stacked" else ray_loss_loop
    with palora_kernels.use_backend(_backend(impl, fused_backend)):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = fn(model, x, y, rays)
    del loss
    return int(sum(seen.values()))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rss_child(conn, model, x, y, rays, impl, passes, fused_backend, threads):
    torch.set_num_threads(threads)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with palora_kernels.use_backend(_backend(impl, fused_backend)):
        for _ in range(2):                           # warm-up: optimizer state, oneDNN primitives, code pages
            _step(model, opt, x, y, rays, passes)
        opt.zero_grad(set_to_none=True)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                             # resets the peak-RSS mark VmHWM (Linux >= 4.0)
        before = _status_kib("VmRSS")
        _step(model, opt, x, y, rays, passes)
        peak = _status_kib("VmHWM")
    conn.send((peak - before) * 1024)
    conn.close()


def rss_growth(model, x, y, rays, impl, passes, fused_backend=None, threads=1) -> int:
    """Peak RSS of a training step above the RSS just before it (bytes), in a fresh process
    (Linux). glibc is told to mmap every block >= 128 KiB (MALLOC_MMAP_THRESHOLD_), so freed
    tensors leave RSS, and the peak-RSS mark (reset before the step) is its peak of live memory:
    activations, saved tensors, temporaries and gradients."""
    import multiprocessing as mp
    import os
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    saved = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    os.environ.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    try:
        proc = ctx.Process(target=_rss_child,
                           args=(child, model, x, y, rays, impl, passes, fused_backend, threads))
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = parent.recv()
    proc.join()
    return int(out)


def measure(model, x, y, rays, *, steps: int = 5, rounds: int = 5, fused_backend=None,
            configs=CONFIGS, rss: bool = True, threads: int = 1) -> dict:
    """Throughput (images/s, median over rounds) and memory of each configuration."""
    device = x.device
    states = {}
    for impl, passes in configs:
        m = copy.deepcopy(model).train()
        states[(impl, passes)] = (m, torch.optim.Adam(m.parameters(), lr=1e-3))
    for (impl, passes), (m, opt) in states.items():            # warm-up, not timed
        with palora_kernels.use_backend(_backend(impl, fused_backend)):
            _step(m, opt, x, y, rays, passes)
    rates = {k: [] for k in states}
    for r in range(rounds):
        keys = list(states)
        keys = keys[r % len(keys):] + keys[:r % len(keys)]     # rotate the order every round
        for key in keys:
            m, opt = states[key]
            with palora_kernels.use_backend(_backend(key[0], fused_backend)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(steps):
                    _step(m, opt, x, y, rays, key[1])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rates[key].append(steps * x.shape[0] / (time.perf_counter() - t0))
    out = {}
    for key, (m, opt) in states.items():
        impl, passes = key
        entry = {"impl": impl, "passes": passes, "images_per_s": statistics.median(rates[key]),
                 "images_per_s_rounds": rates[key],
                 "saved_for_backward_bytes": saved_bytes(m, x, y, rays, impl, passes, fused_backend)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with palora_kernels.use_backend(_backend(impl, fused_backend)):
                _step(m, opt, x, y, rays, passes)
            torch.cuda.synchronize()
            entry["cuda_peak_step_bytes"] = torch.cuda.max_memory_allocated() - base
        elif rss:
            cpu_model = copy.deepcopy(model).cpu()
            entry["cpu_peak_rss_growth_bytes"] = rss_growth(cpu_model, x.cpu(), y.cpu(), rays.cpu(), impl,
                                                            passes, fused_backend, threads)
        out[f"{impl}/{passes}"] = entry
    base = out["unfused/loop"]["images_per_s"] if "unfused/loop" in out else None
    for entry in out.values():
        if base:
            entry["speedup_vs_unfused_loop"] = entry["images_per_s"] / base
    return out
