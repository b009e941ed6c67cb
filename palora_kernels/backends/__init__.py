"""The backends, one package each, and the record each declares (see :mod:`._record`).

    reference  the naive loop over adapters (autograd through torch ops); the test oracle
    torch      stacked GEMMs / convolutions composed from torch ops; any device, any float dtype
    cpp        C++ CPU kernels of palora_kernels._C (the backward's preference gradient)
    triton     Triton kernels (CUDA; CPU tensors under the Triton interpreter)
    cuda       CUDA C++ kernels of palora_kernels._C (where Triton is missing)
    cuda_sim   the same CUDA C++ source run on CPU by a host emulator (tests; needs a source checkout)

Importing this package imports only the records: a backend's kernels (and triton, and the
extension) load the first time one of its kernels is looked up.
"""
from __future__ import annotations

from ._record import Backend
from .cpp import RECORD as _cpp
from .cuda import RECORD as _cuda
from .cuda_sim import RECORD as _cuda_sim
from .reference import RECORD as _reference
from .torch import RECORD as _torch
from .triton import RECORD as _triton

RECORDS = {r.name: r for r in (_reference, _torch, _cpp, _triton, _cuda, _cuda_sim)}

__all__ = ["Backend", "RECORDS"]
