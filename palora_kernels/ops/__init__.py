"""The autograd Functions, one file per op; the kernels they call live in palora_kernels.backends."""
