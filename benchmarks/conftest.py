"""pytest-benchmark microbenchmarks of the PaLoRA layers (setup shared with palora_kernels.bench).

Shapes: PALORA_BENCH_SIZE=quick (default: small shapes, a CI smoke test) or full (the
default shapes of python -m palora_kernels.bench). Run with
    PYTHONPATH=$PWD python -m pytest benchmarks -q                      # smoke
    PALORA_BENCH_SIZE=full PYTHONPATH=$PWD python -m pytest benchmarks  # real numbers
Each (case, mode, pref) is one benchmark group, so its providers share a table. For ratios measured side by side use ``python -m palora_kernels.bench``.
"""
import os

import pytest
import torch

from palora_kernels import bench, reference

SIZE = os.environ.get("PALORA_BENCH_SIZE", "quick")
if SIZE not in ("quick", "full"):
    raise ValueError(f"PALORA_BENCH_SIZE: expected 'quick' or 'full', got {SIZE!r}")
QUICK = SIZE == "quick"


@pytest.fixture(autouse=True, scope="session")
def _threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PALORA_BENCH_THREADS", "2")))
    yield
    torch.set_num_threads(prev)


def check_output(case, provider, pref):
    """The provider computes the layer: compare with the fp64 reference (fp32 tolerance 1e-5)."""
    step = bench.make_step(case, provider, "fwd", pref)
    with torch.no_grad():
        y = step.forward().double()
        t = {k: v.double() for k, v in step.tensors.items()}
        _, scale = bench.make_inputs(case, pref)
        if case.op == "linear":
            exp = reference.palora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"],
                                          t["preference"], scale)
        else:
            exp = reference.palora_conv2d(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"],
                                          t["preference"], scale, 1, case.padding, 1, case.parameterization)
    if provider == "base":      # no adapters: it must differ from the adapted layer
        assert (y - exp).abs().max() > 1e-3 * exp.abs().max()
        return
    err = ((y - exp).abs().max() / exp.abs().max()).item()
    assert err <= 1e-5, f"{provider}: relative error {err:.2e} vs the fp64 reference"


def run_benchmark(benchmark, case_name, provider, mode, pref):
    if not bench.applicable(provider, pref):
        pytest.skip("merged needs a per-batch preference")
    case = bench.get_case(case_name, QUICK)
    check_output(case, provider, pref)
    step = bench.make_step(case, provider, mode, pref)
    benchmark.group = f"{case_name} {mode} {pref}"
    benchmark.extra_info.update(shape=case.describe(), backend=step.backend, threads=torch.get_num_threads())
    benchmark.pedantic(step.run, rounds=5 if QUICK else 15, iterations=1, warmup_rounds=1)
