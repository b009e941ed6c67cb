"""The build refuses a torch other than the runtime's (pip's build isolation fetches its own).

setup.py compares the torch it would compile against with the torch that ``python -E`` (the
environment pip installs into) finds; a mismatch in version or CUDA-ness must stop the build
with the command that fixes it, before anything is compiled."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIX = "pip install --no-build-isolation -e ."

pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs a source checkout (setup.py)")


def _fake_torch(tmp_path, version, cuda):
    """A torch package that only has torch/version.py: what setup.py reads before compiling."""
    pkg = tmp_path / "torch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "version.py").write_text(f"__version__ = {version!r}\ncuda = {cuda!r}\n")
    return tmp_path


def _setup_name(env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("other", ["version", "cuda"])
def test_build_refuses_other_torch(tmp_path, other):
    # The build process sees the fake torch first (as pip's isolated build sees its own torch);
    # python -E in setup.py sees this environment's real torch.
    if other == "version":
        version, cuda = "0.0.1+fake", torch.version.cuda
    else:  # same version, the other CUDA-ness (a CUDA build under a CPU runtime, or the reverse)
        version, cuda = torch.__version__, (None if torch.version.cuda else "13.0")
    out = _setup_name({"PYTHONPATH": str(_fake_torch(tmp_path, version, cuda))})
    assert out.returncode != 0, out.stdout + out.stderr
    msg = out.stdout + out.stderr
    assert "refusing to build" in msg
    assert FIX in msg
    assert version in msg and torch.__version__ in msg


def test_build_override_warns(tmp_path):
    out = _setup_name({"PYTHONPATH": str(_fake_torch(tmp_path, "0.0.1+fake", None)),
                       "PALORA_ALLOW_TORCH_MISMATCH": "1"})
    # it gets past the check (then fails importing the fake torch's cpp_extension: no compiler here)
    msg = out.stdout + out.stderr
    assert "refusing to build" not in msg
    assert "WARNING: building against torch 0.0.1+fake" in msg


def test_build_with_same_torch_says_what_it_builds():
    out = _setup_name({})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "palora-kernels"
    assert "palora-kernels: building palora_kernels._C against torch " + torch.__version__ in out.stderr
    if torch.version.cuda is None:  # a CPU-only torch: the reason must be named
        assert f"NOT the CUDA kernels (torch {torch.__version__} is not a CUDA build)" in out.stderr
    else:
        assert "CUDA kernels for sm" in out.stderr or "NOT the CUDA kernels (" in out.stderr
