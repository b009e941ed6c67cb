"""Dispatch: one function picks the backend; explicit argument > use_backend() > PALORA_BACKEND > auto."""
import logging
import threading

import pytest
import torch

import palora_kernels as pk
from conftest import assert_rel_close
from _layers import graph_has, make_conv, make_linear, reference_with_grads
from palora_kernels import dispatch, reference, select_backend, use_backend

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("PALORA_BACKEND", raising=False)


def test_automatic_choice_on_cpu_is_torch():
    assert select_backend(CPU) == "torch"
    assert dispatch.requested_backend() is None


def test_env_var(monkeypatch):
    monkeypatch.setenv("PALORA_BACKEND", "reference")
    assert select_backend(CPU) == "reference"
    monkeypatch.setenv("PALORA_BACKEND", " torch ")
    assert select_backend(CPU) == "torch"
    monkeypatch.setenv("PALORA_BACKEND", "")
    assert select_backend(CPU) == "torch"


def test_context_manager_nesting_and_restore(monkeypatch):
    monkeypatch.setenv("PALORA_BACKEND", "reference")
    with use_backend("torch"):                          # the context manager beats the env var
        assert select_backend(CPU) == "torch"
        with use_backend("reference"):
            assert select_backend(CPU) == "reference"
            with use_backend("torch"):
                assert select_backend(CPU) == "torch"
            assert select_backend(CPU) == "reference"
        assert select_backend(CPU) == "torch"
        with pytest.raises(KeyError):
            with use_backend("reference"):
                raise KeyError("restored on error too")
        assert select_backend(CPU) == "torch"
    assert select_backend(CPU) == "reference"           # back to the env var
    monkeypatch.delenv("PALORA_BACKEND")
    with use_backend("reference"):
        with use_backend(None):                         # None: back to automatic choice
            assert select_backend(CPU) == "torch"
        assert select_backend(CPU) == "reference"


def test_explicit_argument_wins(monkeypatch):
    monkeypatch.setenv("PALORA_BACKEND", "reference")
    with use_backend("reference"):
        assert select_backend(CPU, "torch") == "torch"
    with use_backend("torch"):
        assert select_backend(CPU, "reference") == "reference"


def test_context_manager_is_thread_local():
    seen = {}
    with use_backend("reference"):
        t = threading.Thread(target=lambda: seen.setdefault("other", select_backend(CPU)))
        t.start()
        t.join()
        assert select_backend(CPU) == "reference"
    assert seen["other"] == "torch"


def test_automatic_choice_on_cuda_falls_back_and_says_why(monkeypatch, caplog):
    """Selection logic alone (no GPU needed): stand-in modules and availability checks."""
    monkeypatch.setitem(dispatch._BACKEND_MODULES, "triton", "palora_kernels.ops.torch_kernels")
    monkeypatch.setitem(dispatch._BACKEND_MODULES, "cuda", "palora_kernels.ops.torch_kernels")
    reasons = {"triton": "no triton (test)", "cuda": "extension not built (test)"}
    for name in ("triton", "cuda"):
        monkeypatch.setitem(dispatch._availability, name, lambda dev, n=name: reasons[n])
    cuda = torch.device("cuda")
    with caplog.at_level(logging.DEBUG, logger="palora_kernels"):
        assert select_backend(cuda) == "torch"
    assert "no triton (test)" in caplog.text and "extension not built (test)" in caplog.text
    with pytest.raises(RuntimeError, match=r"backend 'triton' was requested but cannot run on cuda: no triton"):
        select_backend(cuda, "triton")
    reasons["cuda"] = None
    assert select_backend(cuda) == "cuda"
    reasons["triton"] = None
    assert select_backend(cuda) == "triton"            # triton first when both can run
    assert select_backend(CPU) == "torch"               # a CPU tensor never picks a GPU backend


def test_kernel_registry():
    from palora_kernels.ops import torch_kernels
    assert dispatch.kernel("torch", "lora_mm") is torch_kernels.lora_mm
    assert dispatch.kernel("torch", "lora_conv2d") is torch_kernels.lora_conv2d
    with pytest.raises(NotImplementedError, match=r"backend 'torch' has no kernel for op 'nope'"):
        dispatch.kernel("torch", "nope")


@pytest.mark.parametrize("kind", ["linear", "conv-factorized", "conv-loralib"])
@pytest.mark.parametrize("pref_kind", ["batch", "sample"])
def test_layers_route_through_the_selected_backend(kind, pref_kind):
    if kind == "linear":
        layer, x = make_linear(6, 5, 3, 2), torch.randn(4, 3, 6)
    else:
        layer = make_conv(3, 4, 3, 3, 2, padding=1, parameterization=kind.split("-")[1])
        x = torch.randn(4, 3, 5, 5)
    p = torch.rand(3) if pref_kind == "batch" else torch.rand(4, 3)
    args = (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, p, layer.scaling)
    if kind == "linear":
        direct = reference.palora_linear(*args)
    else:
        direct = reference.palora_conv2d(*args, layer.stride, layer.padding, layer.dilation,
                                         layer.parameterization)
    with use_backend("reference"):
        y_ref_backend = layer(x, p)
    assert torch.equal(y_ref_backend, direct)           # the reference backend IS the reference loop
    fused_fn = "PaLoRALinearFunction" if kind == "linear" else "PaLoRAConv2dFunction"
    assert not graph_has(y_ref_backend, fused_fn)
    with use_backend("torch"):
        y_torch = layer(x, p)
    if kind != "conv-loralib":                          # loralib runs plain ops (merged / one big conv)
        assert graph_has(y_torch, fused_fn)
    y64, _ = reference_with_grads(layer, x, lambda t: t, p, lambda t: t)
    assert_rel_close(y_torch, y64, torch.float32, "torch backend")
    assert_rel_close(y_ref_backend, y64, torch.float32, "reference backend")


def test_functional_backend_argument():
    layer, x, p = make_linear(6, 5, 2, 3), torch.randn(7, 6), torch.rand(2)
    args = (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, p, layer.scaling)
    assert torch.equal(pk.palora_linear(*args, backend="reference"), reference.palora_linear(*args))
    with use_backend("reference"):
        assert graph_has(pk.palora_linear(*args, backend="torch"), "PaLoRALinearFunction")
