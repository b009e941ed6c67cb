"""One function decides which backend runs an op: :func:`select_backend`.

It reads the records the backends declare (:mod:`palora_kernels.backends`: ops, dtypes, devices,
layout) and nothing else. Requested backend: the ``backend=`` argument, else ``with
use_backend(name):``, else ``PALORA_BACKEND``. A requested backend that cannot run the op raises
with the reason; automatic choice takes the first backend, by priority, that can, and logs at
debug level why it skipped the others.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Callable, Dict, Optional, Tuple

import torch

from .backends import RECORDS, Backend
from .backends._record import load

log = logging.getLogger("palora_kernels")

BACKENDS = tuple(RECORDS)
# *_dropout: the op under LoRA dropout (docs/dropout.md), declared by a backend whose kernel draws the mask;
# lora_dropout_dA: the backward's dA_cat = dH^T x~ with the mask regenerated; lora_tmm: the linear backward's
# (U * S)^T V products, dA_cat and dB_cat (palora_kernels._math.row_scaled_tmm); lora_mm_dgrad: the linear
# backward's products of dY together (dX, dG, dB_cat^T, db) where a backend reads dY once for several of them
OPS = ("lora_mm", "lora_tmm", "lora_mm_dgrad", "lora_conv2d", "loralib_conv2d", "pref_grad", "lora_conv2d_dgrad",
       "lora_conv2d_wgrad", "lora_conv2d_pref_grad", "mtlora_mm", "mtlora_mm_dgrad", "lora_mm_dropout",
       "lora_conv2d_dropout", "lora_dropout_dA")
_local = threading.local()
# (backend, device, op, dtype) -> reason or None. Availability does not change while a process
# runs; the cache keeps a layer call free of imports (and so traceable by torch.compile).
_why_not: Dict[Tuple[str, torch.device, str, torch.dtype], Optional[str]] = {}
_kernels: Dict[Tuple[str, str], Callable] = {}


def record(name: str) -> Backend:
    return RECORDS[_check_name(name, "backend")]


def clear_cache() -> None:
    """Forget availability answers (tests that pretend to be another machine call this)."""
    _why_not.clear()
    _kernels.clear()


def _check_name(name: str, source: str) -> str:
    if name not in RECORDS:
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def why_not(name: str, device: torch.device, op: str, dtype: torch.dtype) -> Optional[str]:
    """Why backend ``name`` cannot run ``op`` on ``dtype`` tensors on ``device`` (None if it can)."""
    key = (name, device, op, dtype)
    if key in _why_not:
        return _why_not[key]
    try:
        reason = RECORDS[name].why_not(device, op, dtype)
    except Exception as exc:  # a failed import or extension load is a reason, not a crash
        reason = f"its availability check failed: {type(exc).__name__}: {exc}"
    return _remember(_why_not, key, reason)


def _remember(cache: dict, key, value):
    """cache[key] = value, except while torch.compile traces: Dynamo refuses a write to a global inside an
    autograd.Function (a layer's backward asking for a helper op the first time); the next eager call caches."""
    if not torch.compiler.is_compiling():
        cache[key] = value
    return value


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force a backend inside the block. ``None`` lifts an enclosing ``use_backend`` for the block
    (``PALORA_BACKEND``, if set, then applies; otherwise the choice is automatic)."""
    if name is not None:
        _check_name(name, "use_backend(name)")
    prev = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = prev


def requested_backend(explicit: Optional[str] = None) -> Optional[str]:
    """The backend asked for: the argument, else the context manager, else PALORA_BACKEND."""
    if explicit is not None:
        return _check_name(explicit, "backend")
    name = getattr(_local, "backend", None)
    if name is not None:
        return name
    env = os.environ.get("PALORA_BACKEND", "").strip()
    return _check_name(env, "PALORA_BACKEND") if env else None


def _debug(*args) -> None:
    """log.debug, except while torch.compile traces: a logging call there is a graph break (fullgraph=True
    fails on it, e.g. a Triton layer's backward asking for the lora_tmm it lacks)."""
    if not torch.compiler.is_compiling():
        log.debug(*args)


def select_backend(device, op: str = "lora_mm", dtype: torch.dtype = torch.float32,
                   explicit: Optional[str] = None, *, fallback: bool = False) -> str:
    """The backend that runs ``op`` on ``dtype`` tensors living on ``device``.

    fallback=True: a requested backend that lacks the op yields to automatic choice instead of
    raising (for the helper ops a layer's backward needs, such as pref_grad).
    """
    device = torch.device(device)
    if op not in OPS:
        raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
    want = requested_backend(explicit)
    if want is not None:
        reason = why_not(want, device, op, dtype)
        if reason is None:
            return want
        if not fallback:
            raise RuntimeError(f"backend {want!r} was requested for op {op!r} on {device} "
                               f"({str(dtype).replace('torch.', '')}) but cannot run it: {reason}")
        _debug("palora: requested backend %s cannot run %s: %s", want, op, reason)
    for name in sorted((n for n, r in RECORDS.items() if r.automatic_on(device)),
                       key=lambda n: RECORDS[n].priority):
        reason = why_not(name, device, op, dtype)
        if reason is None:
            return name
        _debug("palora: backend %s skipped for %s on %s: %s", name, op, device, reason)
    raise RuntimeError(f"no backend runs op {op!r} on {device} ({dtype})")


def kernel(backend: str, op: str) -> Callable:
    """The implementation of ``op`` that backend ``backend`` declares (imported on first use)."""
    key = (backend, op)
    fn = _kernels.get(key)
    if fn is None:
        rec = record(backend)
        if op not in rec.kernels:
            raise NotImplementedError(f"backend {backend!r} has no kernel for op {op!r} "
                                      f"(it runs: {', '.join(sorted(rec.kernels))})")
        fn = _remember(_kernels, key, load(rec.kernels[op]))
    return fn


def is_composite(backend: str, op: str) -> bool:
    """True when the backend's ``op`` is the whole layer as a differentiable torch composition."""
    return op in record(backend).composite
