"""Shared test helpers: the per-dtype tolerance table and the relative-error measure.

Relative error = max |actual - expected| / max |expected|, with ``expected`` the fp64
reference (palora_kernels.reference). Tolerances are kept tight on purpose: a loose tolerance hides bugs (docs/testing.md).
"""
import os

# The Triton backend runs on CPU tensors only under the interpreter, and @triton.jit picks the
# interpreter when the kernels are decorated: set it before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# max-abs error relative to the max-abs of the fp64 reference
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if e.numel() == 0:
        return 0.0
    scale = e.abs().max().clamp_min(1e-30)
    return ((a - e).abs().max() / scale).item()


def assert_rel_close(actual, expected, dtype, what=""):
    err = rel_err(actual, expected)
    tol = TOL[dtype]
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} ({dtype})"


@pytest.fixture
def one_thread():
    """Tiny tensors: a second OpenMP thread only adds spin-waits, and under load from other processes
    2 threads ran the training/BN/data/DDP tests ~3x slower here (170 s vs 55 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    # never query the GPU at import time; decide once here
    has_cuda = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this project's machines)")
    for item in items:
        if "requires_cuda" in item.keywords and not has_cuda:
            item.add_marker(skip)
