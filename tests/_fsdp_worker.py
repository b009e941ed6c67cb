"""Worker of tests/test_ddp.py::test_two_process_fsdp2_matches_one_process (run by torchrun).

Every PaLoRA layer is one FSDP2 unit (fully_shard), then the root; each rank trains on its half
of the global batch; rank 0 also trains an unsharded copy on the whole batch and writes the
largest weight difference to argv[1]."""
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]
import palora_kernels  # noqa: E402
from multidigits.nets import MultiLeNet  # noqa: E402
from multidigits.training import ray_loss_stacked  # noqa: E402
from palora_kernels.nn import PaLoRAConv2d, PaLoRALinear  # noqa: E402

LR, STEPS, BATCH = 2e-3, 3, 16

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
torch.manual_seed(0)
single = palora_kernels.convert(MultiLeNet([10, 10]), num_tasks=2, rank=2, lora_alpha=2.0)
model = copy.deepcopy(single)
for m in model.modules():
    if isinstance(m, (PaLoRAConv2d, PaLoRALinear)):
        fully_shard(m, mesh=mesh)          # W, b, lora_A, lora_B of a layer are gathered together
fully_shard(model, mesh=mesh)
g = torch.Generator().manual_seed(1)
x, y = torch.rand(BATCH, 1, 14, 14, generator=g), torch.randint(0, 10, (BATCH, 2), generator=g)
rays = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
opt, opt_single = torch.optim.Adam(model.parameters(), lr=LR), torch.optim.Adam(single.parameters(), lr=LR)
b = BATCH // world
for _ in range(STEPS):
    loss, _ = ray_loss_stacked(model, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b], rays)
    opt.zero_grad()
    loss.backward()
    opt.step()
    loss, _ = ray_loss_stacked(single, x, y, rays)
    opt_single.zero_grad()
    loss.backward()
    opt_single.step()
diff = moved = 0.0
torch.manual_seed(0)                       # the initial weights again, to check training moved them
init = palora_kernels.convert(MultiLeNet([10, 10]), num_tasks=2, rank=2, lora_alpha=2.0)
for p, ps, p0 in zip(model.parameters(), single.parameters(), init.parameters()):
    full = p.full_tensor()
    diff = max(diff, (full - ps).abs().max().item())
    moved = max(moved, (ps - p0).abs().max().item())
if rank == 0:
    Path(sys.argv[1]).write_text(json.dumps({"max_abs_diff": diff, "moved": moved, "lr": LR, "steps": STEPS}))
dist.destroy_process_group()
