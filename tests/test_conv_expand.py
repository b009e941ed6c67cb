"""The torch backend's conv expand (one 2-D @ 3-D matmul + add since ba19a9b) against the fp64
reference, per-batch and per-sample preferences, forward and every gradient."""
import pytest
import torch

from conftest import assert_rel_close
from palora_kernels import reference
from palora_kernels.functional import palora_conv2d


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_sample", [False, True], ids=["per-batch", "per-sample"])
@pytest.mark.parametrize("N,C_in,C_out,T,r,hw,pad",
                         [(7, 3, 10, 2, 2, 9, 2), (1, 1, 4, 3, 1, 5, 0), (12, 10, 20, 3, 3, 7, 2)])
def test_torch_conv_matches_reference(N, C_in, C_out, T, r, hw, pad, per_sample, dtype):
    g = torch.Generator().manual_seed(N * 31 + T)
    x = torch.randn(N, C_in, hw, hw, generator=g, dtype=torch.float64)
    w = torch.randn(C_out, C_in, 5, 5, generator=g, dtype=torch.float64) * 0.2
    b = torch.randn(C_out, generator=g, dtype=torch.float64)
    A = torch.randn(T, r, C_in, 5, 5, generator=g, dtype=torch.float64) * 0.2
    B = torch.randn(T, C_out, r, generator=g, dtype=torch.float64)
    p = torch.rand(N, T, generator=g, dtype=torch.float64) if per_sample else torch.rand(T, generator=g,
                                                                                         dtype=torch.float64)
    dy = torch.randn(N, C_out, hw - 4 + 2 * pad, hw - 4 + 2 * pad, generator=g, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in (x, w, b, A, B, p)]
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    y_ref = reference.palora_conv2d(*leaves64[:5], leaves64[5], 0.7, 1, pad)
    y = palora_conv2d(*leaves[:5], leaves[5], 0.7, padding=pad, backend="torch")
    assert_rel_close(y, y_ref, dtype, "y")
    (y_ref * dy).sum().backward()
    (y * dy.to(dtype)).sum().backward()
    for name, a, e in zip("x w b A B p".split(), leaves, leaves64):
        assert_rel_close(a.grad, e.grad, dtype, f"d{name}")
