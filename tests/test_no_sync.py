"""No host synchronisation in a layer's forward or backward.

On a GPU, reading a tensor's value on the host (.item(), bool(t), .tolist(), float(t)) waits for
every queued kernel. These tests make each such call raise while a layer runs forward and backward
(torch backend, every layer kind and preference kind), so a sync added to the hot path fails here
even though this machine has no GPU.
"""
import pytest
import torch

from _layers import make_conv, make_linear

SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.fixture
def no_host_reads(monkeypatch):
    calls = []

    def forbid(name):
        def f(self, *a, **k):
            calls.append(name)
            raise AssertionError(f"host sync on the hot path: Tensor.{name}()")
        return f

    def arm():
        for name in SYNCING:
            monkeypatch.setattr(torch.Tensor, name, forbid(name))

    def disarm():
        monkeypatch.undo()
    return arm, disarm, calls


def test_the_guard_catches_a_sync(no_host_reads):
    arm, disarm, calls = no_host_reads
    arm()
    with pytest.raises(AssertionError, match="host sync"):
        bool(torch.ones(1) > 0)
    disarm()
    assert calls == ["__bool__"]


@pytest.mark.parametrize("kind", ["linear", "factorized", "loralib"])
@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
@pytest.mark.parametrize("rows", ["few", "many"])    # many rows + per-batch: the merged/weight-space path
def test_forward_and_backward_do_not_sync(no_host_reads, kind, pref_kind, rows):
    arm, disarm, calls = no_host_reads
    n = 2 if rows == "few" else 64
    if kind == "linear":
        layer, x = make_linear(6, 5, 3, 2), torch.randn(n, 3, 6)
    else:
        layer, x = make_conv(3, 4, 3, 3, 2, padding=1, parameterization=kind), torch.randn(n, 3, 5, 5)
    p = (torch.rand(3) if pref_kind == "batch" else torch.rand(n, 3)).requires_grad_()
    x.requires_grad_()
    arm()
    try:
        y = layer(x, p)
        torch.autograd.backward(y, torch.ones_like(y))
    finally:
        disarm()
    assert calls == []
    assert x.grad is not None and p.grad is not None and layer.lora_A.grad is not None
