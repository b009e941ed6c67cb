"""MultiDigits: deterministic, split on source digits, labels and pixels as documented."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
pytest.importorskip("sklearn")

from multidigits import data as md  # noqa: E402


def test_deterministic_and_seeded():
    a = md.make_multidigits("train", 300, 2, seed=0)
    b = md.make_multidigits("train", 300, 2, seed=0)
    c = md.make_multidigits("train", 300, 2, seed=1)
    assert a.digest() == b.digest() and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.digest() != c.digest()
    assert md.make_multidigits("test", 300, 2, seed=0).digest() != a.digest()


def test_source_splits_disjoint_and_complete():
    parts = [set(md.source_indices(s).tolist()) for s in md.SPLITS]
    assert sum(len(p) for p in parts) == 1797 and set().union(*parts) == set(range(1797))
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert [len(p) for p in parts] == [1078, 359, 360]
    for s, p in zip(md.SPLITS, parts):
        d = md.make_multidigits(s, 500, 2, seed=3)
        assert set(d.sources.flatten().tolist()) <= p      # test images use unseen digit samples


def test_labels_and_pixels():
    digits, targets = md._load_digits()
    d = md.make_multidigits("val", 200, 3, seed=0)
    assert d.images.shape == (200, 1, 14, 14) and d.images.dtype == torch.float32
    assert d.labels.shape == (200, 3) and d.labels.dtype == torch.int64
    src = d.sources.numpy()
    assert np.array_equal(d.labels[:, 0].numpy(), targets[src[:, 0]])
    assert np.array_equal(d.labels[:, 1].numpy(), targets[src[:, 1]])
    assert np.array_equal(d.labels[:, 2].numpy(), (targets[src[:, 0]] + targets[src[:, 1]]) % 2)
    assert 0 <= float(d.images.min()) and float(d.images.max()) <= 1
    # every image is the pixel-wise max of its two digits at some allowed offsets
    for i in range(20):
        img = d.images[i, 0].numpy()
        found = False
        for rl in range(3):
            for cl in range(3):
                for rr in range(4, 7):
                    for cr in range(4, 7):
                        canvas = np.zeros((2, 14, 14), np.float32)
                        canvas[0, rl:rl + 8, cl:cl + 8] = digits[src[i, 0]]
                        canvas[1, rr:rr + 8, cr:cr + 8] = digits[src[i, 1]]
                        found |= np.array_equal(canvas.max(0), img)
        assert found, f"image {i} is not two placed digits"


def test_two_task_variant_and_bad_args():
    d = md.make_multidigits("train", 50, 2, seed=0)
    assert d.labels.shape == (50, 2) and int(d.labels.max()) <= 9
    with pytest.raises(ValueError, match="num_tasks"):
        md.make_multidigits("train", 10, 4)
    with pytest.raises(ValueError, match="split"):
        md.make_multidigits("holdout", 10)
    assert len(md.make_multidigits("test", 0)) == 0
