"""Loads the compiled extension palora_kernels._C (registers the palora:: C++/CUDA ops).

A missing or broken build is not fatal: every op has a PyTorch implementation, and
``_C_AVAILABLE`` says which one runs.
"""
from __future__ import annotations

import importlib
import warnings

try:
    _C = importlib.import_module("palora_kernels._C")  # a plain import error names the real cause
    _C_AVAILABLE = True
    _C_ERROR = None
except ImportError as exc:  # not built (e.g. a plain source checkout) or ABI mismatch
    _C_AVAILABLE = False
    _C_ERROR = str(exc)
    warnings.warn(f"palora_kernels._C is not available ({exc}); using the PyTorch implementations. "
                  "Build it with `pip install --no-build-isolation -e .`", RuntimeWarning, stacklevel=2)
