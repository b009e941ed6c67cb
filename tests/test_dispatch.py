"""Dispatch: one function picks the backend; explicit argument > use_backend() > PALORA_BACKEND > auto."""
import logging
import threading

import pytest
import torch

import palora_kernels as pk
from conftest import assert_rel_close
from _layers import graph_has, make_conv, make_linear, reference_with_grads
from palora_kernels import _ext, dispatch, reference, select_backend, use_backend

CPU = torch.device("cpu")
# automatic choice for lora_mm on CPU: the C++ kernels when the extension is built, else torch ops
AUTO = "cpp" if _ext._C_AVAILABLE else "torch"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("PALORA_BACKEND", raising=False)


def test_automatic_choice_on_cpu_is_cpp_when_built():
    assert select_backend(CPU) == AUTO
    assert dispatch.requested_backend() is None


def test_env_var(monkeypatch):
    monkeypatch.setenv("PALORA_BACKEND", "reference")
    assert select_backend(CPU) == "reference"
    monkeypatch.setenv("PALORA_BACKEND", " torch ")
    assert select_backend(CPU) == "torch"
    monkeypatch.setenv("PALORA_BACKEND", "")
    assert select_backend(CPU) == AUTO


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
            assert select_backend(CPU) == AUTO
        assert select_backend(CPU) == "reference"


def test_explicit_argument_wins(monkeypatch):
    monkeypatch.setenv("PALORA_BACKEND", "reference")
    with use_backend("reference"):
        assert select_backend(CPU, explicit="torch") == "torch"
    with use_backend("torch"):
        assert select_backend(CPU, explicit="reference") == "reference"


def test_context_manager_is_thread_local():
    seen = {}
    with use_backend("reference"):
        t = threading.Thread(target=lambda: seen.setdefault("other", select_backend(CPU)))
        t.start()
        t.join()
        assert select_backend(CPU) == "reference"
    assert seen["other"] == AUTO


CUDA = torch.device("cuda")


@pytest.fixture
def pretend(monkeypatch):
    """Pretend this machine has a GPU: set which backends' availability checks pass (no GPU needed:
    selection reads the records and calls the checks, which are patched here)."""
    import palora_kernels.backends.cuda as cuda_rec
    import palora_kernels.backends.triton as triton_rec

    def machine(triton: bool, cuda_ext: bool):
        dispatch.clear_cache()
        monkeypatch.setattr(triton_rec, "check", lambda dev: None if triton else "no triton (pretend)")
        monkeypatch.setattr(cuda_rec, "check", lambda dev: None if cuda_ext else "extension not built (pretend)")
    yield machine
    dispatch.clear_cache()


def test_automatic_choice_on_cuda_falls_back_and_says_why(pretend, caplog):
    pretend(triton=False, cuda_ext=False)
    with caplog.at_level(logging.DEBUG, logger="palora_kernels"):
        assert select_backend(CUDA, "lora_mm") == "torch"
    assert "no triton (pretend)" in caplog.text and "extension not built (pretend)" in caplog.text
    with pytest.raises(RuntimeError, match=r"backend 'triton' was requested for op 'lora_mm' on cuda .*no triton"):
        select_backend(CUDA, "lora_mm", torch.float32, "triton")
    pretend(triton=False, cuda_ext=True)
    assert select_backend(CUDA, "lora_mm") == "cuda"
    pretend(triton=True, cuda_ext=True)
    assert select_backend(CUDA, "lora_mm") == "triton"          # triton first when both can run
    assert select_backend(CPU, "lora_mm") == AUTO               # the interpreter runs only on request


def _ops_reached(monkeypatch):
    """Every (op, dtype) that PaLoRALinear and both PaLoRAConv2d parameterisations ask dispatch for,
    with both preference kinds, forward and backward, in every dtype (run on CPU, recorded)."""
    seen = set()
    real = dispatch.select_backend

    def spy(device, op="lora_mm", dtype=torch.float32, explicit=None, **kw):
        seen.add((op, dtype))
        return real(device, op, dtype, explicit, **kw)
    monkeypatch.setattr(dispatch, "select_backend", spy)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for kind in ("linear", "factorized", "loralib"):
            for pref_kind in ("batch", "sample"):
                if kind == "linear":
                    layer, x = make_linear(6, 5, 3, 2, dtype=dtype), torch.randn(4, 3, 6, dtype=dtype)
                else:
                    layer = make_conv(3, 4, 3, 3, 2, padding=1, parameterization=kind, dtype=dtype)
                    x = torch.randn(4, 3, 5, 5, dtype=dtype)
                p = (torch.rand(3) if pref_kind == "batch" else torch.rand(4, 3)).requires_grad_(True)
                layer(x, p).sum().backward()
    monkeypatch.setattr(dispatch, "select_backend", real)
    return seen


@pytest.mark.parametrize("machine", ["triton+cuda", "cuda-extension-only"])
def test_every_op_a_layer_reaches_resolves_on_a_cuda_machine(machine, monkeypatch, pretend):
    """The crash this guards against: dispatch picked triton by device for a factorized conv, and
    triton has no conv kernel. Every op a layer reaches must resolve to a kernel that exists."""
    seen = _ops_reached(monkeypatch)
    ops = {op for op, _ in seen}
    assert {"lora_mm", "lora_conv2d", "loralib_conv2d", "pref_grad"} <= ops, ops
    pretend(triton=machine == "triton+cuda", cuda_ext=True)
    for op, dtype in sorted(seen, key=str):
        name = select_backend(CUDA, op, dtype)
        rec = dispatch.record(name)
        assert op in rec.kernels and dtype in rec.dtypes and (not rec.devices or "cuda" in rec.devices), \
            (op, dtype, name)
        assert callable(dispatch.kernel(name, op)), (op, dtype, name)
        if op == "lora_mm" and machine == "triton+cuda":
            assert name == "triton"
        if op in ("lora_mm", "lora_conv2d") and machine == "cuda-extension-only":
            assert name == ("torch" if dtype == torch.float64 else "cuda")   # the kernels run no fp64


def test_a_requested_backend_that_lacks_the_op_or_dtype_raises_with_the_reason(pretend):
    pretend(triton=True, cuda_ext=True)
    with pytest.raises(RuntimeError, match=r"'triton' .* no kernel for op 'pref_grad' \(it runs: lora_conv2d, "):
        select_backend(CUDA, "pref_grad", torch.float32, "triton")
    with pytest.raises(RuntimeError, match=r"'cuda' .* it runs bfloat16, float16, float32, not float64"):
        select_backend(CUDA, "lora_mm", torch.float64, "cuda")
    with pytest.raises(RuntimeError, match=r"'cuda_sim' .* runs on cpu tensors, not cuda"):
        select_backend(CUDA, "lora_mm", torch.float32, "cuda_sim")
    # helper ops of the backward fall back to automatic choice instead
    # (cuda_sim has a pref_grad kernel since issue 10; triton has none)
    assert select_backend(CPU, "pref_grad", torch.float32, "triton", fallback=True) in ("cpp", "torch")
    assert select_backend(CPU, "pref_grad", torch.float32, "cuda_sim", fallback=True) == "cuda_sim"
    with pytest.raises(ValueError, match=r"op: expected one of .*got 'nope'"):
        select_backend(CPU, "nope")


def test_kernel_lookup():
    from palora_kernels.backends.torch import kernels as torch_kernels
    assert dispatch.kernel("torch", "lora_mm") is torch_kernels.lora_mm
    assert dispatch.kernel("torch", "lora_conv2d") is torch_kernels.lora_conv2d
    with pytest.raises(NotImplementedError, match=r"backend 'torch' has no kernel for op 'nope'"):
        dispatch.kernel("torch", "nope")


def test_records_are_consistent():
    from palora_kernels.backends import RECORDS
    for name, rec in RECORDS.items():
        assert rec.name == name and rec.kernels and rec.dtypes
        assert set(rec.composite) <= set(rec.kernels)
        assert rec.h_row_stride(12) % rec.h_row_align == 0 and rec.h_row_stride(12) >= 12


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
