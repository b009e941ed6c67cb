"""The miniature MTLoRA experiment (python/train_mtlora.py): pixel labels of MultiDigits, the
Swin-like model and its conversion to MTLoRA, Delta_m and mIoU, and a smoke run of the script
whose parameter counts are checked against counts made here from the architecture."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import train_mtlora  # noqa: E402
from mtlora_model import MiniSwin, MultiTaskNet, to_mtlora  # noqa: E402
from multidigits.segmentation import INK, SEG_CLASSES, with_masks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = train_mtlora.TASKS


def test_pixel_labels_follow_the_composed_image():
    md, masks = with_masks("val", 300, layout="hard")
    assert masks.shape == (300, 12, 12) and masks.dtype == torch.int64
    # a pixel is inked (label > 0) exactly when the max of the two digits reaches INK
    assert torch.equal(masks > 0, md.images[:, 0] >= INK)
    counts = torch.bincount(masks.flatten(), minlength=len(SEG_CLASSES))
    assert len(counts) == len(SEG_CLASSES) and bool((counts > 0).all()), counts
    # left-digit ink never lies outside the left digit's 8x8 box (offsets 0..2 on the hard layout)
    assert not bool(((masks == 1) | (masks == 3))[:, 10:, :].any())
    assert not bool(((masks == 2) | (masks == 3))[:, :2, :].any())      # right digit starts at row >= 2


def test_mtlora_conversion_keeps_the_pretrained_function():
    """B = 0 at conversion: the shared and every task output equal the pretrained network's."""
    torch.manual_seed(0)
    bb = MiniSwin(dim=8)
    net = MultiTaskNet(bb, TASKS).eval()
    x = torch.rand(3, 1, 12, 12)
    before = {t: v.detach() for t, v in net(x).items()}
    feats_before = [f.detach() for f, _ in bb(x)]
    to_mtlora(bb, list(TASKS), r_shared=4, r_task=2, dropout=0.1, shared_mode="matrixv2")
    net.eval()                                       # the new layers start in training mode; eval: no dropout
    after = net(x)
    for t in TASKS:
        torch.testing.assert_close(after[t], before[t], rtol=1e-5, atol=1e-6)
    for (f, ft), fb in zip(bb(x), feats_before):
        torch.testing.assert_close(f, fb, rtol=1e-5, atol=1e-6)
        assert set(ft) == set(TASKS)                 # every stage returns one feature map per task
    specific = sorted(n for n, m in bb.named_modules() if getattr(m, "tasks", None))
    assert specific == sorted(f"stages.{s}.blocks.1.{k}" for s in range(3) for k in ("attn.proj", "fc1", "fc2"))


def test_delta_m_and_miou():
    ref = {"seg": {"miou": 0.5}, "left": {"accuracy": 0.8}, "right": {"accuracy": 0.4}}
    got = {"seg": {"miou": 0.6}, "left": {"accuracy": 0.8}, "right": {"accuracy": 0.3}}
    assert train_mtlora.delta_m(got, ref) == pytest.approx(100 * (0.2 + 0 - 0.25) / 3)
    train_mtlora.LOWER_IS_BETTER.add("right")        # an error metric: a lower value is an improvement
    try:
        assert train_mtlora.delta_m(got, ref) == pytest.approx(100 * (0.2 + 0 + 0.25) / 3)
    finally:
        train_mtlora.LOWER_IS_BETTER.discard("right")

    class Oracle(torch.nn.Module):                    # predicts the labels it is given via the image
        def forward(self, x):
            lab = x.long()[:, 0]
            return {"seg": torch.nn.functional.one_hot(lab, 4).permute(0, 3, 1, 2).float()}
    lab = torch.randint(0, 4, (5, 12, 12))
    y = torch.cat([torch.zeros(5, 2, dtype=torch.int64), lab.flatten(1)], 1)
    res = train_mtlora.evaluate(Oracle(), lab[:, None].float(), y, ["seg"], 12)
    assert res["seg"]["miou"] == 1.0 and res["seg"]["pixel_accuracy"] == 1.0
    wrong = train_mtlora.evaluate(Oracle(), ((lab + 1) % 4)[:, None].float(), y, ["seg"], 12)
    assert wrong["seg"]["miou"] == 0.0


def _adapter_count(dims, depths, r_sh, r_t, T):
    """Shared LoRA on qkv, proj, fc1, fc2 of every block and the patch-merging reduction; task LoRA on
    proj, fc1, fc2 of each stage's last block (r (in + out) parameters per adapter)."""
    n = 0
    for i, (d, depth) in enumerate(zip(dims, depths)):
        n += depth * r_sh * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
        if i < len(dims) - 1:
            n += r_sh * (4 * d + 2 * d)
        n += T * r_t * ((d + d) + (d + 4 * d) + (4 * d + d))
    return n


def test_smoke_run_writes_json_png_and_counts_match(tmp_path):
    dim, r_sh, r_t = 8, 4, 2
    out = tmp_path / "run"
    train_mtlora.main(["--epochs", "1", "--train-size", "192", "--val-size", "64", "--test-size", "64",
                       "--pretrain-steps", "3", "--batch-size", "64", "--dim", str(dim), "--r-shared", str(r_sh),
                       "--r-task", str(r_t), "--out", str(out), "--no-progress"])
    res = json.loads((out / "mtlora.json").read_text())
    assert (out / "mtlora.png").stat().st_size > 10_000
    assert set(res["methods"]) == set(train_mtlora.METHODS)
    for m, r in res["methods"].items():
        assert set(r) >= {"params", "val", "test", "delta_m", "steps", "seconds"}, m
        assert r["steps"] == 3
        for split in ("val", "test"):
            assert 0.0 <= r[split]["seg"]["miou"] <= 1.0 and 0.0 <= r[split]["seg"]["pixel_accuracy"] <= 1.0
            assert all(0.0 <= r[split][t]["accuracy"] <= 1.0 for t in ("left", "right"))
    assert res["methods"]["single_task_lora"]["delta_m"]["test"] == 0.0

    # counts made here: the plain model's parameters by module, the adapters from the architecture
    bb = MiniSwin(dim=dim)
    backbone = sum(p.numel() for p in bb.parameters())
    dec = {t: sum(p.numel() for p in MultiTaskNet(bb, {t: TASKS[t]}).decoders.parameters()) for t in TASKS}
    other = sum(p.numel() for n, p in bb.named_parameters()       # what the reference keeps trainable
                if "patch_embed" in n or "norm" in n or "relative_position_bias_table" in n)
    dims, depths = [dim, 2 * dim, 4 * dim], [2, 2, 2]
    mt = _adapter_count(dims, depths, r_sh, r_t, len(TASKS))
    st = _adapter_count(dims, depths, r_sh, 0, 0)
    ms = res["methods"]
    assert ms["full_ft"]["params"]["trainable"] == backbone + sum(dec.values())
    assert ms["decoders_only"]["params"]["trainable"] == sum(dec.values())
    for m in ("mtlora_matrix", "mtlora_matrixv2"):
        assert ms[m]["params"]["adapters"] == mt
        assert ms[m]["params"]["trainable"] == mt + other + sum(dec.values())
        assert ms[m]["params"]["total"] == backbone + mt + sum(dec.values())
    assert ms["single_task_lora"]["params"]["trainable"] == len(TASKS) * (st + other) + sum(dec.values())
    assert res["full_ft_params_over"]["mtlora_matrix"] == pytest.approx(
        (backbone + sum(dec.values())) / (mt + other + sum(dec.values())))


def test_to_mtlora_places_adapters_as_convert_mtlora():
    """The experiment's conversion and the library's convert_mtlora (the reference's default placement)
    put the same layers on the same modules, with the same parameter shapes and the same base weights."""
    import palora_kernels
    torch.manual_seed(0)
    a = MiniSwin(dim=8)
    b = MiniSwin(dim=8)
    b.load_state_dict(a.state_dict())
    to_mtlora(a, list(TASKS), r_shared=4, r_task=2)
    ranks = {"shared": 4, **{t: 2 for t in TASKS}}
    palora_kernels.convert_mtlora(b, list(TASKS), ranks, lora_shared_scale=4.0, lora_task_scale=4.0)
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}   # noqa: E731
    assert shapes(a) == shapes(b)
    for n, p in b.named_parameters():
        if "lora_" not in n:
            torch.testing.assert_close(p, dict(a.named_parameters())[n], rtol=0, atol=0)
    frozen = lambda m: {n for n, p in m.named_parameters() if not p.requires_grad}   # noqa: E731
    assert {n for n in frozen(b)} <= frozen(a)       # convert_mtlora freezes the swapped linears only
    assert all(n.endswith(("linear.weight", "linear.bias")) for n in frozen(b))
