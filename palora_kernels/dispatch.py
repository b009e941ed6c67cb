"""One function decides the backend of every op: :func:`select_backend`.

Automatic choice: CUDA tensor + Triton -> ``triton``; CUDA tensor + built CUDA
extension -> ``cuda``; otherwise ``torch`` (the CPU composition of stacked GEMMs).
``PALORA_BACKEND`` or ``with use_backend(name):`` override it; an explicitly
requested backend that cannot run raises with the reason, while automatic selection
falls back and logs why at debug level.

Backends register kernels per op name with :func:`register_kernel`; each backend lives
in a module that is imported the first time it is selected.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
from typing import Callable, Optional

import torch

log = logging.getLogger("palora_kernels")

BACKENDS = ("reference", "torch", "triton", "cuda", "cuda_sim")

# backend name -> module that registers its kernels on import
_BACKEND_MODULES = {
    "torch": "palora_kernels.ops.torch_kernels",
    "triton": "palora_kernels.triton",
    "cuda": "palora_kernels.ops.cuda_kernels",
    "cuda_sim": "palora_kernels.ops.cuda_sim",
}
_kernels: dict[tuple[str, str], Callable] = {}
_availability: dict[str, Callable[[torch.device], Optional[str]]] = {}
_local = threading.local()


def register_kernel(backend: str, op: str):
    """Decorator: ``@register_kernel("torch", "lora_mm")``."""
    def deco(fn):
        _kernels[(backend, op)] = fn
        return fn
    return deco


def register_availability(backend: str, check: Callable[[torch.device], Optional[str]]):
    """``check(device)`` returns None when the backend can run there, else the reason."""
    _availability[backend] = check


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` (None if it can)."""
    if backend == "reference":
        return None
    module = _BACKEND_MODULES[backend]
    if module not in sys.modules:   # already imported: no importlib call for torch.compile to trace
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, a failed extension load, a missing toolchain
            return f"importing {module} failed: {exc}"
    check = _availability.get(backend)
    return check(device) if check is not None else None


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


def select_backend(device: torch.device, explicit: Optional[str] = None) -> str:
    """The backend that runs an op whose tensors live on ``device``."""
    want = requested_backend(explicit)
    if want is not None:
        reason = unavailable_reason(want, device)
        if reason is not None:
            raise RuntimeError(f"backend {want!r} was requested but cannot run on {device}: {reason}")
        return want
    if device.type == "cuda":
        for name in ("triton", "cuda"):
            reason = unavailable_reason(name, device)
            if reason is None:
                return name
            log.debug("palora: backend %s skipped on %s: %s", name, device, reason)
    return "torch"


def kernel(backend: str, op: str) -> Callable:
    """The registered implementation of ``op`` for ``backend``."""
    try:
        return _kernels[(backend, op)]
    except KeyError:
        importlib.import_module(_BACKEND_MODULES[backend])
        try:
            return _kernels[(backend, op)]
        except KeyError:
            raise NotImplementedError(f"backend {backend!r} has no kernel for op {op!r}") from None
