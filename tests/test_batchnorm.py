"""RayGroupBatchNorm1d/2d against a loop of plain nn.BatchNorm passes, one per ray group."""
import copy

import pytest
import torch
from torch import nn

from conftest import TOL, rel_err
from palora_kernels.nn import (RayGroupBatchNorm1d, RayGroupBatchNorm2d, convert_batchnorm, ray_groups,
                               set_ray_groups)


pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [  # (class, plain class, shape of one group's batch without the batch dim)
    (RayGroupBatchNorm2d, nn.BatchNorm2d, (3, 5, 4)),
    (RayGroupBatchNorm1d, nn.BatchNorm1d, (7,)),
    (RayGroupBatchNorm1d, nn.BatchNorm1d, (4, 6)),
]


def _pair(cls, plain_cls, C, momentum, affine=True, track=True, dtype=torch.float64):
    torch.manual_seed(0)
    ref = plain_cls(C, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    mod = convert_batchnorm(copy.deepcopy(ref))
    assert type(mod) is cls
    return mod, ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("cls,plain_cls,shape", CASES, ids=["2d", "1d", "1d-seq"])
def test_matches_loop_of_plain_batchnorm(cls, plain_cls, shape, momentum, dtype):
    G, B = 4, 5
    mod, ref = _pair(cls, plain_cls, shape[0], momentum, dtype=dtype)
    mod.num_groups = G
    tol = TOL[dtype]
    for step in range(3):                         # running stats accumulate over steps
        x = (torch.randn(G * B, *shape, dtype=dtype) * (1 + step) + step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        dy = torch.randn(G * B, *shape, dtype=dtype)
        y = mod(x)
        y_ref = torch.cat([ref(x_ref[g * B:(g + 1) * B]) for g in range(G)])   # G passes, in order
        assert rel_err(y, y_ref) <= tol
        (y * dy).sum().backward()
        (y_ref * dy).sum().backward()
        assert rel_err(x.grad, x_ref.grad) <= tol
        for name in ("weight", "bias"):
            assert rel_err(getattr(mod, name).grad, getattr(ref, name).grad) <= tol, name
        assert rel_err(mod.running_mean, ref.running_mean) <= tol
        assert rel_err(mod.running_var, ref.running_var) <= tol
        assert int(mod.num_batches_tracked) == int(ref.num_batches_tracked) == G * (step + 1)
    # eval mode: running statistics, the same for every group
    mod.eval(), ref.eval()
    x = torch.randn(G * B, *shape, dtype=dtype)
    assert rel_err(mod(x), ref(x)) <= tol


def test_groups_are_not_pooled():
    """Each group is normalised with its own statistics: shifting group 1 changes nothing in group 0."""
    mod = RayGroupBatchNorm2d(3, num_groups=2)
    x = torch.randn(8, 3, 4, 4)
    x2 = x.clone()
    x2[4:] = x2[4:] * 5 + 3
    assert torch.equal(mod(x)[:4], mod(x2)[:4])
    assert not torch.allclose(nn.BatchNorm2d(3)(x)[:4], nn.BatchNorm2d(3)(x2)[:4])


def test_no_affine_no_running_stats():
    G, B = 3, 4
    for affine, track in ((False, True), (True, False), (False, False)):
        mod, ref = _pair(RayGroupBatchNorm2d, nn.BatchNorm2d, 2, 0.1, affine, track)
        mod.num_groups = G
        x = torch.randn(G * B, 2, 3, 3, dtype=torch.float64)
        y_ref = torch.cat([ref(x[g * B:(g + 1) * B]) for g in range(G)])
        assert rel_err(mod(x), y_ref) <= TOL[torch.float64]
        if track:
            assert rel_err(mod.running_var, ref.running_var) <= TOL[torch.float64]


def test_one_group_is_the_plain_module():
    mod, ref = _pair(RayGroupBatchNorm2d, nn.BatchNorm2d, 3, 0.1, dtype=torch.float32)
    x = torch.randn(6, 3, 4, 4)
    assert torch.equal(mod(x), ref(x))
    assert torch.equal(mod.running_mean, ref.running_mean)
    assert list(mod.state_dict()) == list(ref.state_dict())


def test_bad_batch_and_num_groups():
    mod = RayGroupBatchNorm2d(3, num_groups=4)
    with pytest.raises(ValueError, match="num_groups=4.*batch size 6"):
        mod(torch.randn(6, 3, 2, 2))
    with pytest.raises(ValueError, match="num_groups"):
        RayGroupBatchNorm1d(3, num_groups=0)
    with pytest.raises(ValueError, match="num_groups"):
        set_ray_groups(nn.Sequential(mod), 0)
    mod.eval()
    assert mod(torch.randn(6, 3, 2, 2)).shape == (6, 3, 2, 2)    # eval ignores groups


def test_convert_and_context():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    net[1].running_mean.fill_(0.5)
    convert_batchnorm(net, num_groups=2)
    assert isinstance(net[1], RayGroupBatchNorm2d) and isinstance(net[4], RayGroupBatchNorm1d)
    assert torch.equal(net[1].running_mean, torch.full((4,), 0.5))
    assert net[1].num_groups == 2
    with ray_groups(net, 5):
        assert net[1].num_groups == net[4].num_groups == 5
    assert net[1].num_groups == 2
    set_ray_groups(net, 1)
    assert net[4].num_groups == 1
