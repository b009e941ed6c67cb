"""Dense labels for MultiDigits and a single-digit pre-training set (docs/mtlora_experiment.md).

Because the MultiDigits images are composed, the owner of every pixel is known. ``with_masks``
rebuilds the two per-digit canvases of ``make_multidigits`` by replaying its random draws
(same generator, same order), checks that their pixel-wise max reproduces the returned images
exactly, and labels each pixel:

    0 background, 1 left digit only, 2 right digit only, 3 both digits

where a digit "has ink" at a pixel when its source value is >= INK (4/16: the scikit-learn digits
are 0..16 grey levels, and values 1-3 are the blur of the 32x32 -> 8x8 downsampling). The
"both" class exists because on the hard layout the digits overlap on over half of their boxes
and the max of two saturated strokes (16 and 16) cannot be given to either digit; it is a class,
not an ignore label, so every pixel is scored.

``single_digits`` is the pre-training task: one source digit of a split on an empty canvas of the
same size, at a random offset, labelled with its class (an ImageNet-classification stand-in).
"""
from __future__ import annotations

import numpy as np
import torch

from multidigits.data import DIGIT, LAYOUTS, _SPLIT_STREAM, _load_digits, make_multidigits, source_indices

INK = 4.0 / 16.0
SEG_CLASSES = ("background", "left", "right", "both")


def with_masks(split: str, size: int | None = None, seed: int = 0, layout: str = "hard"):
    """``make_multidigits(split, size, 2, seed, layout)`` and its (N, side, side) int64 pixel labels."""
    md = make_multidigits(split, size, num_tasks=2, seed=seed, layout=layout)
    side, (lo_l, hi_l), (lo_r, hi_r) = LAYOUTS[layout]
    n = len(md)
    digits, _ = _load_digits()
    src = source_indices(split)
    # the draws of make_multidigits, in its order: pairs, left offsets, right offsets
    rng = np.random.Generator(np.random.PCG64([seed, _SPLIT_STREAM[split]]))
    pairs = src[rng.integers(0, len(src), size=(n, 2))]
    offsets = (rng.integers(lo_l, hi_l + 1, size=(n, 2)), rng.integers(lo_r, hi_r + 1, size=(n, 2)))
    if not np.array_equal(pairs, md.sources.numpy()):
        raise RuntimeError("with_masks: replayed digit pairs differ from make_multidigits'; "
                           "python/multidigits/data.py changed its draws")
    canvas = np.zeros((n, 2, side, side), dtype=np.float32)
    rows, dr, dc = np.arange(n)[:, None, None], np.arange(DIGIT)[None, :, None], np.arange(DIGIT)[None, None, :]
    for slot, off in enumerate(offsets):
        canvas[rows, slot, off[:, 0, None, None] + dr, off[:, 1, None, None] + dc] = digits[pairs[:, slot]]
    if not np.array_equal(canvas.max(axis=1), md.images[:, 0].numpy()):
        raise RuntimeError("with_masks: replayed canvases do not reproduce make_multidigits' images")
    ink = canvas >= INK
    masks = ink[:, 0].astype(np.int64) + 2 * ink[:, 1].astype(np.int64)   # 0 / 1 left / 2 right / 3 both
    return md, torch.from_numpy(masks)


def single_digits(split: str, size: int, seed: int = 0, layout: str = "hard"):
    """(images (N, 1, side, side), labels (N,)): one source digit of ``split`` per canvas, at a random offset."""
    side = LAYOUTS[layout][0]
    digits, targets = _load_digits()
    src = source_indices(split)
    rng = np.random.Generator(np.random.PCG64([seed, 100 + _SPLIT_STREAM[split]]))
    pick = src[rng.integers(0, len(src), size=size)]
    off = rng.integers(0, side - DIGIT + 1, size=(size, 2))
    img = np.zeros((size, 1, side, side), dtype=np.float32)
    rows, dr, dc = np.arange(size)[:, None, None], np.arange(DIGIT)[None, :, None], np.arange(DIGIT)[None, None, :]
    img[rows, 0, off[:, 0, None, None] + dr, off[:, 1, None, None] + dc] = digits[pick]
    return torch.from_numpy(img), torch.from_numpy(targets[pick])
