"""PaLoRAConv2d 3x3: base / unfused / fused / merged, fwd and fwd+bwd, per-batch and per-sample p,
factorized and loralib adapters."""
import pytest

from palora_kernels.bench import MODES, PREFS, PROVIDERS

from .conftest import run_benchmark


@pytest.mark.parametrize("pref", PREFS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", ["conv", "conv-loralib"])
def test_conv2d(benchmark, case, provider, mode, pref):
    run_benchmark(benchmark, case, provider, mode, pref)
