"""Host-side ops: one file per op (autograd Function + launch), plus backend kernels."""
