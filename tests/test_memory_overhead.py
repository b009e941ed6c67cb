"""python/memory_overhead.py: the paper's architectures at full size, parameter counts of each method."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import memory_overhead as mo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_multilenet_counts_by_hand():
    c = mo.counts("multilenet_multimnist")
    # conv 1->10 5x5, conv 10->20 5x5, linear 320->50, two heads 50->50->10
    base = (10 * 25 + 10) + (20 * 10 * 25 + 20) + (320 * 50 + 50) + 2 * ((50 * 50 + 50) + (50 * 10 + 10))
    assert c["base_params"] == base
    o = c["overhead_params"]
    r, T = mo.RANK, 2
    loralib = T * r * 5 * ((1 + 10) * 5) + T * r * 5 * ((10 + 20) * 5)           # r k (C_in k) + (C_out k) r k
    linear = T * r * ((320 + 50) + 2 * ((50 + 50) + (50 + 10)))
    assert o["palora_loralib"] == loralib + linear
    assert o["palora_factorized"] == T * r * ((25 + 10) + (250 + 20)) + linear
    assert o["pamal"] == base and o["cosmos"] == T * 10 * 25


def test_segnet_cityscapes_full_size():
    c = mo.counts("segnet_cityscapes")          # also asserts the count equals palora_kernels.convert's
    assert c["tasks"] == 2 and c["overhead_params"]["pamal"] == c["base_params"]
    m = mo.build("segnet_nyuv2")
    outs = m(torch.zeros(1, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(1, 13, 32, 32), (1, 1, 32, 32), (1, 3, 32, 32)]


def test_phn_chunk_count():
    # 24 x 20,000 weights per chunk: 25M target parameters need 53 chunks
    assert mo.phn_params(25_000_000, 2) - mo.phn_params(1, 2) == 52 * 64
