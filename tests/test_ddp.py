"""2-process DDP (gloo, CPU, loopback via torchrun --standalone) gives the weights of 1 process
with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

LR, STEPS = 2e-3, 4
ARGS = ["--epochs", "1", "--train-size", "512", "--val-size", "50", "--test-size", "50", "--batch-size", "64",
        "--max-steps", str(STEPS), "--lr", str(LR), "--rays", "3", "--no-baselines", "--no-eval", "--no-bench",
        "--no-progress", "--device", "cpu"]


def _run(cmd, tmp_path, name):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    out = tmp_path / f"{name}.pt"
    proc = subprocess.run(cmd + [str(ROOT / "python" / "train_multidigits.py"), *ARGS,
                                 "--out", str(tmp_path / name), "--save-weights", str(out)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, torch.load(out)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_process_ddp_matches_one_process(tmp_path):
    pytest.importorskip("sklearn")
    _, single = _run([sys.executable], tmp_path, "single")
    proc, ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                     tmp_path, "ddp")
    assert "world 2" in proc.stdout

    from multidigits.nets import MultiLeNet
    import palora_kernels
    torch.manual_seed(0)                                   # the script's initialisation (seed 0)
    init = palora_kernels.convert(MultiLeNet([10, 10]), num_tasks=2, rank=2, lora_alpha=2.0).state_dict()

    # Adam moves a weight by at most ~lr per step; gloo sums the two half-batch gradients in another
    # order than one process sums the batch (~1e-7 relative), which Adam's g / (sqrt(v) + eps) can
    # turn into up to ~1e-3 lr for near-zero gradient entries (measured here: 2.4e-4 lr after 4 steps).
    tol = 1e-3 * LR * STEPS
    assert set(single) == set(ddp)
    moved = 0.0
    for name, w in single.items():
        diff = (w - ddp[name]).abs().max().item()
        assert diff <= tol, f"{name}: |single - ddp| = {diff:.3g} > {tol:.3g}"
        moved = max(moved, (w - init[name]).abs().max().item())
    assert moved > 100 * tol, "training did not move the weights: the comparison would test nothing"


def test_two_process_fsdp2_matches_one_process(tmp_path):
    """The FSDP recipe of docs/training.md: fully_shard each PaLoRA layer, then the root."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not in this torch")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed gloo")
    out = tmp_path / "fsdp.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "_fsdp_worker.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    tol = 1e-3 * res["lr"] * res["steps"]              # as for DDP above
    assert res["max_abs_diff"] <= tol, res
    assert res["moved"] > 100 * tol, res
