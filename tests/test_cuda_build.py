"""Static checks of the compiled CUDA extension (no GPU needed): both archs present, no spills,
tensor cores where intended, and the torch bindings registered. Skips cleanly when
palora_kernels._C holds no CUDA code (a CPU torch, no nvcc, PALORA_SKIP_CUDA_BUILD=1)."""
import os

import pytest
import torch

import palora_kernels  # noqa: F401  (loads _C)
from palora_kernels.tools import cuda_report

_why = cuda_report.unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no CUDA build to inspect: {_why}")

KERNELS = ({f"{op}.{role}" for op in ("lora_mm", "lora_conv2d") for role in ("fused", "shrink")}
           | {"lora_conv2d_dgrad.fused", "lora_conv2d_wgrad.splitk", "mtlora_mm.gemm"})
# B's shared-memory orientation: lora_mm has both (W^T forward, W in dX); conv weights are k-major;
# wgrad's B is im2col(x) with its pixel rows (n-major); mtlora_mm's gemm: k-major forward, n-major dgrad
B_LAYOUTS = {"lora_mm": ("k-major", "n-major"), "lora_conv2d": ("k-major",), "lora_conv2d_dgrad": ("k-major",),
             "lora_conv2d_wgrad": ("n-major",), "mtlora_mm": ("k-major", "n-major")}


def _archs():
    archs = os.environ.get("PALORA_CUDA_ARCHS", "8.0;9.0").replace(",", ";")
    return {f"sm_{a.strip().replace('.', '')}" for a in archs.split(";") if a.strip()}


@pytest.fixture(scope="module")
def rows():
    return cuda_report.cuda_rows()


def _gemm(rows):
    return [r for r in rows if "expect_ldgsts" in r]


def test_fatbin_holds_every_arch(rows):
    assert {r["arch"] for r in rows} == _archs()
    for arch in _archs():   # (2 B layouts for lora_mm, 1 for conv) x 2 configs x 3 dtypes, + dgrad, wgrad per arch
        got = [(r["kernel"], r["config"].split()[0], r["config"].split()[-1]) for r in _gemm(rows) if r["arch"] == arch]
        want = [(k, d, b) for k in KERNELS for d in ("fp32", "fp16", "bf16") for b in B_LAYOUTS[k.split(".")[0]]]
        assert sorted(got) == sorted(want), arch
        pref = sorted((r["kernel"], r["config"].split()[0]) for r in rows if r["arch"] == arch and r not in _gemm(rows))
        assert pref == sorted([("pref_grad.finish", "fp32")] + [("pref_grad.partial", d) for d in ("bf16", "fp16", "fp32")]
                              + [("lora_conv2d_wgrad.finish", d) for d in ("bf16", "fp16", "fp32")]
                              + [("mtlora_mm.dropout", d) for d in ("bf16", "fp16", "fp32")])


def test_no_kernel_spills(rows):
    spilled = [(r["kernel"], r["config"], r["arch"], r["spills"]) for r in rows if r["spills"]]
    assert not spilled, f"kernels using local memory (spills): {spilled}"
    assert all(r["registers"] <= 255 and r["smem"] <= 48 * 1024 for r in rows)


def test_cp_async_ldmatrix_and_no_64bit_division(rows):
    """Issue 10: LDGSTS in every kernel with a 16-byte path, LDSM in the 16-bit ones, no 64-bit division."""
    from palora_kernels.tools.kernel_report import problems
    for r in _gemm(rows):
        # the conv's dX kernel gathers both operands element by element: no 16-byte path
        assert (r["ldgsts"] > 0) == (r["kernel"] != "lora_conv2d_dgrad.fused"), r
        assert r["div64"] == 0 and r["calls"] == 0, r    # no division subroutine at all
        if r["config"].startswith(("fp16", "bf16")):
            assert r["ldsm"] > 0, r
        assert problems(r) == [], r


def test_tensor_cores_for_fp16_bf16_only(rows):
    for r in _gemm(rows):
        if r["config"].startswith(("fp16", "bf16")) and int(r["arch"][3:]) >= 80:
            assert r["tensor_core"] > 0, r
        if r["config"].startswith("fp32"):
            assert r["tensor_core"] == 0, r   # fp32 stays on FMAs: TF32 would miss the 1e-5 tolerance


def test_bindings_registered_for_cuda_only():
    schema = str(torch.ops.palora.lora_mm_cuda.default._schema)
    assert "Tensor? bias" in schema and "int rows_per_sample" in schema
    assert "int[] stride" in str(torch.ops.palora.lora_conv2d_cuda.default._schema)
    assert "int rank" in str(torch.ops.palora.pref_grad_cuda.default._schema)
    assert "int[] x_hw" in str(torch.ops.palora.lora_conv2d_dgrad_cuda.default._schema)
    assert "bool need_weight" in str(torch.ops.palora.lora_conv2d_wgrad_cuda.default._schema)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.palora.pref_grad_cuda(torch.zeros(4, 2), torch.zeros(4, 2), torch.ones(1, 1), 4, 2, 1.0)
    x = torch.zeros(4, 3)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.palora.lora_mm_cuda(x, torch.zeros(3, 2), None, torch.zeros(3, 2), torch.zeros(2, 2),
                                      torch.ones(1, 1), 4, 1.0)


def test_torch_headers_are_parsed_by_one_unit():
    """Build time (docs/cuda.md, Build): every .cpp that includes a torch header is compiled through
    csrc/cpu/all_torch_ops.cpp (setup.py's TORCH_UNIT), none includes the umbrella headers (ATen/ATen.h,
    torch/torch.h, torch/extension.h), and no CUDA kernel source includes a torch header at all."""
    import re
    from pathlib import Path
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    if not csrc.is_dir():
        pytest.skip("needs a source checkout (csrc/)")
    unit = csrc / "cpu" / "all_torch_ops.cpp"
    members = {(unit.parent / m).resolve() for m in re.findall(r'^#include "([^"]+\.cpp)"', unit.read_text(), re.M)}
    torch_inc = re.compile(r"^#include <(torch|ATen|c10)/", re.M)
    for f in sorted(csrc.glob("cuda/*.cu*")) + sorted(csrc.glob("cuda/*.h")):
        assert not torch_inc.search(f.read_text()), f"{f.name} includes a torch header"
    for f in sorted(csrc.glob("cpu/*.cpp")) + sorted(csrc.glob("cuda/*.cpp")):
        text = f.read_text()
        assert not re.search(r"^#include <(ATen/ATen|torch/torch|torch/extension)\.h>", text, re.M), f.name
        if torch_inc.search(text):
            assert f.resolve() in members, f"{f.name} includes torch headers but is not in {unit.name}"


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_backend_matches_reference_on_gpu(dtype):
    from conftest import assert_rel_close
    from palora_kernels import PaLoRALinear, reference
    torch.manual_seed(0)
    layer = PaLoRALinear(203, 150, num_tasks=3, rank=3, lora_alpha=6.0, device="cuda")
    with torch.no_grad():
        layer.lora_B.normal_()
    layer = layer.to(dtype)
    x = torch.randn(5, 23, 203, device="cuda").to(dtype)
    pref = torch.rand(5, 3, device="cuda")
    y = palora_kernels.palora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, pref,
                                     layer.scaling, backend="cuda")
    p64 = [t.double() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
    yr = reference.palora_linear(x.double(), *p64, pref.double(), layer.scaling)
    assert_rel_close(y, yr, dtype, "cuda backend y")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_pref_grad_matches_reference_on_gpu(dtype):
    from conftest import assert_rel_close
    g = torch.Generator(device="cuda").manual_seed(0)
    h, dg = (torch.randn(600, 12, device="cuda", generator=g).to(dtype) for _ in range(2))
    pref = torch.rand(4, 3, device="cuda", generator=g)
    dp = torch.ops.palora.pref_grad_cuda(h, dg, pref, 150, 4, 0.5)
    ref = (h.double() * dg.double()).reshape(4, 150, 3, 4).sum(dim=(1, 3)) * 0.5
    assert_rel_close(dp, ref, torch.float32, "pref_grad_cuda")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_conv2d_fwd_bwd_matches_reference_on_gpu(dtype):
    """Forward (lora_conv2d), dX/dG (lora_conv2d_dgrad), dW/dA (lora_conv2d_wgrad) and d(preference)
    (pref_grad on the 4-D H) on the cuda backend, per-sample preference."""
    from conftest import assert_rel_close
    from palora_kernels import PaLoRAConv2d, reference
    torch.manual_seed(0)
    layer = PaLoRAConv2d(8, 24, 3, stride=2, padding=1, num_tasks=3, rank=4, lora_alpha=4.0, device="cuda")
    with torch.no_grad():
        layer.lora_B.normal_()
    layer = layer.to(dtype)
    x = torch.randn(4, 8, 17, 15, device="cuda").to(dtype).requires_grad_()
    pref = torch.rand(4, 3, device="cuda", requires_grad=True)
    y = palora_kernels.palora_conv2d(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, pref, layer.scaling,
                                     stride=2, padding=1, backend="cuda")
    y.float().square().sum().backward()
    p64 = [t.detach().double().requires_grad_() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
    xr = x.detach().double().requires_grad_()
    pr = pref.detach().double().requires_grad_()
    yr = reference.palora_conv2d(xr, *p64, pr, layer.scaling, stride=2, padding=1)
    yr.square().sum().backward()
    assert_rel_close(y, yr, dtype, "cuda conv y")
    assert_rel_close(x.grad, xr.grad, dtype, "cuda conv dx")
    for p, r, name in zip((layer.weight, layer.lora_A), (p64[0], p64[2]), ("dW", "dA")):
        assert_rel_close(p.grad, r.grad, dtype, f"cuda conv {name}")
    assert_rel_close(pref.grad, pr.grad, dtype, "cuda conv dpref")
