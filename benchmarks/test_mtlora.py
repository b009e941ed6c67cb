"""MTLoRALinear / MTLoRAQKV: fused vs the reference composition, fwd+bwd with a frozen base, at
MTLoRA's Swin-T stage shapes (setup shared with palora_kernels.bench_mtlora; PALORA_BENCH_SIZE as in
conftest.py). For time and peak-memory ratios measured side by side use
``python -m palora_kernels.bench_mtlora``."""
import dataclasses

import pytest
import torch

from palora_kernels import bench_mtlora as bm

from .conftest import QUICK

CASES = bm.QUICK_CASES if QUICK else bm.CASES


def _check_same_outputs(case):
    """Every provider computes the same T+1 outputs (fp32, relative 1e-5 against the reference). Under
    dropout the providers draw different masks (nn.Dropout vs the counter-based one), so the check runs the
    same layer without dropout; tests/test_mtlora.py checks the fused dropout against an explicit mask."""
    case = dataclasses.replace(case, dropout=0.0)
    outs = {}
    for p in bm.PROVIDERS:
        if bm.applicable(case, p):
            with torch.no_grad():
                y, lt = bm.make_step(case, p).forward()
            outs[p] = [y] + [lt[t] for t in sorted(lt)]
    for p, ys in outs.items():
        for a, b in zip(ys, outs["reference"]):
            err = ((a - b).abs().max() / b.abs().max()).item()
            assert err <= 1e-5, f"{p}: relative error {err:.2e} vs the reference composition"


@pytest.mark.parametrize("provider", bm.PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_mtlora(benchmark, case, provider):
    c = CASES[case]
    if not bm.applicable(c, provider):
        pytest.skip("reference-once is the MTLoRAQKV composition only")
    if provider == "fused":
        _check_same_outputs(c)
    step = bm.make_step(c, provider)
    benchmark.group = f"mtlora {case} fwd+bwd"
    benchmark.extra_info.update(shape=c.describe(), threads=torch.get_num_threads())
    benchmark.pedantic(step.run, rounds=5 if QUICK else 15, iterations=1, warmup_rounds=1)
