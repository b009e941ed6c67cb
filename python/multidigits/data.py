"""MultiDigits: a MultiMNIST-style two-digit data set built from scikit-learn's bundled digits.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 handwritten digits (values 0..16),
so nothing is downloaded. Each MultiDigits image is a square canvas holding two of them,
the "left" digit at a random offset (top-left) and the "right" digit further down-right,
combined with a pixel-wise max as in MultiMNIST. Two layouts (``LAYOUTS``):

* ``easy`` (the original): 14x14 canvas, left offsets {0,1,2}^2, right {4,5,6}^2; the 8x8
  boxes overlap on 2..6 rows and columns (4x4 on average, a quarter of each digit). The
  tasks barely conflict: one net reaches ~94% on both (docs/training.md).
* ``hard`` (the script's default): 12x12 canvas, left {0,1,2}^2, right {2,3,4}^2; the boxes
  overlap on 4..8 rows and columns (6x6 on average, over half of each digit; fully on top of
  each other when the offsets coincide), so the shared features must separate two
  superimposed digits and the tasks compete for them.

Tasks: 0 = class of the left digit (10 classes), 1 = class of the right digit (10);
the 3-task variant adds 2 = parity of their sum (2 classes: 0 even, 1 odd).

Splits are made on the SOURCE digits first (60/20/20 of the 1,797 by a fixed
permutation), so every validation/test image is made of digit samples never seen in
training. Everything is a pure function of (split, size, seed): no global RNG is touched.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

DIGIT = 8
# layout: (canvas side, inclusive offset range of the left digit, of the right digit)
LAYOUTS = {"easy": (14, (0, 2), (4, 6)), "hard": (12, (0, 2), (2, 4))}
CANVAS, LEFT_OFFSETS, RIGHT_OFFSETS = LAYOUTS["easy"]
SPLITS = ("train", "val", "test")
SOURCE_FRACTIONS = (0.6, 0.2, 0.2)
DEFAULT_SIZES = {"train": 12000, "val": 2000, "test": 2000}
SPLIT_SEED = 1797          # fixes the source-digit split; independent of the pair seed
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}


def num_classes(num_tasks: int) -> list[int]:
    if num_tasks not in (2, 3):
        raise ValueError(f"num_tasks: expected 2 or 3, got {num_tasks}")
    return [10, 10] if num_tasks == 2 else [10, 10, 2]


def _load_digits():
    from sklearn.datasets import load_digits   # imported here: the extra is optional
    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def source_indices(split: str) -> np.ndarray:
    """Indices into load_digits() of the source digits of ``split`` (disjoint across splits)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    n = 1797
    perm = np.random.Generator(np.random.PCG64(SPLIT_SEED)).permutation(n)
    n_train = int(round(SOURCE_FRACTIONS[0] * n))
    n_val = int(round(SOURCE_FRACTIONS[1] * n))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    lo, hi = bounds[split]
    return np.sort(perm[lo:hi])


@dataclass
class MultiDigits:
    """images (N, 1, side, side) float32 in [0, 1]; labels (N, T) int64; sources (N, 2) indices of the
    left/right source digits into load_digits()."""
    images: torch.Tensor
    labels: torch.Tensor
    sources: torch.Tensor
    split: str
    num_tasks: int

    def __len__(self) -> int:
        return self.images.shape[0]

    def digest(self) -> str:
        """sha256 of images and labels: equal digests = identical data."""
        h = hashlib.sha256()
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()


def make_multidigits(split: str, size: int | None = None, num_tasks: int = 2, seed: int = 0,
                     layout: str = "easy") -> MultiDigits:
    """Build ``size`` MultiDigits images of ``split`` deterministically from (split, size, seed, layout)."""
    classes = num_classes(num_tasks)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {tuple(LAYOUTS)}, got {layout!r}")
    canvas_side, (lo_l, hi_l), (lo_r, hi_r) = LAYOUTS[layout]
    size = DEFAULT_SIZES[split] if size is None else size
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size: expected an int >= 0, got {size!r}")
    digits, targets = _load_digits()
    src = source_indices(split)
    rng = np.random.Generator(np.random.PCG64([seed, _SPLIT_STREAM[split]]))
    pairs = src[rng.integers(0, len(src), size=(size, 2))]                     # (N, 2)
    off_left = rng.integers(lo_l, hi_l + 1, size=(size, 2))
    off_right = rng.integers(lo_r, hi_r + 1, size=(size, 2))

    canvas = np.zeros((size, 2, canvas_side, canvas_side), dtype=np.float32)
    rows = np.arange(size)[:, None, None]
    dr = np.arange(DIGIT)[None, :, None]
    dc = np.arange(DIGIT)[None, None, :]
    for slot, off in ((0, off_left), (1, off_right)):
        r = off[:, 0, None, None] + dr
        c = off[:, 1, None, None] + dc
        canvas[rows, slot, r, c] = digits[pairs[:, slot]]
    images = canvas.max(axis=1, keepdims=True)                                 # (N, 1, side, side)

    left, right = targets[pairs[:, 0]], targets[pairs[:, 1]]
    labels = [left, right] + ([(left + right) % 2] if num_tasks == 3 else [])
    labels = np.stack(labels, axis=1)
    assert labels.max(initial=0) < max(classes)
    return MultiDigits(torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(pairs),
                       split, num_tasks)
