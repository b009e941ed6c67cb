"""The PaLoRA paper's memory claim, reproduced where it can be: parameter and optimizer-state
overhead of preference-conditioned training on the paper's architectures at full size.

    PYTHONPATH=. python python/memory_overhead.py                 # the table (about a minute on CPU)
    PYTHONPATH=. python python/memory_overhead.py --no-measure    # counts only, seconds
    PYTHONPATH=. python python/memory_overhead.py --json docs/memory_overhead/memory_overhead.json

Architectures (random weights, no data), as the paper uses them:
* SegNet (the MTAN encoder-decoder without attention, filters 64-128-256-512-512, 3x3 conv + BN
  + ReLU blocks, max-pool with indices / max-unpool; per task a head conv3x3 64->64 then conv1x1
  64->C): Cityscapes, 2 tasks (7-class segmentation, depth); NYUv2, 3 tasks (13-class
  segmentation, depth, surface normals).
* MultiLeNet for MultiMNIST (28x28): conv5x5 1->10, pool, conv5x5 10->20, pool, linear 320->50;
  per task linear 50->50, linear 50->10.

Methods, overhead = what a method adds to the plain multi-task network (one copy of the weights):
* PaLoRA: rank r=4 adapters per task on every conv and linear (palora_kernels.convert); conv
  adapters in the reference's loralib layout (and the factorized layout for comparison).
* PaMaL: T full copies of the network mixed by the preference: (T - 1) x the weights.
* COSMOS: the preference fed as T extra constant input channels: T x C_out x k x k weights of
  the first conv.
* PHN (Pareto hypernetwork, chunked): a hypernetwork that outputs every weight of the target
  network in chunks: preference embedding 32, chunk embedding 64, MLP hidden 100, 24 output
  matrices of 20,000 x 100, as many chunks as the target needs (the reference's SegNet
  hyperparameters). Its own parameters replace the target's, overhead = hypernetwork - target.
Bytes of training state per parameter: fp32 weight + gradient + Adam's two moments = 16 B.

Measured: the peak RSS of building the model, its Adam optimizer and one training step (forward,
backward, Adam; after one warm-up step) above the RSS after imports, at a small input, in a fresh
process per (architecture, method) with glibc told to return freed blocks >= 128 KiB (so the
peak is live memory). Not measured for PHN (the hypernetwork forward is not implemented here).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FILTERS = (64, 128, 256, 512, 512)
# (name, tasks' output channels, input channels, small input (N, H, W) for the measured step)
ARCHS = {
    # small inputs keep the full-size aspect ratios (Cityscapes 128x256, NYUv2 288x384), sides divisible by 32
    "segnet_cityscapes": dict(tasks=(7, 1), in_ch=3, small=(2, 64, 128), paper_ratio=23.8),
    "segnet_nyuv2": dict(tasks=(13, 1, 3), in_ch=3, small=(2, 96, 128), paper_ratio=31.7),
    "multilenet_multimnist": dict(tasks=(10, 10), in_ch=1, small=(256, 28, 28), paper_ratio=None),
}
RANK = 4
STATE_BYTES_PER_PARAM = 16      # fp32 weight + grad + Adam exp_avg + exp_avg_sq


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegNet(nn.Module):
    """Shared SegNet encoder-decoder and one conv head per task; forward -> list of T maps."""

    def __init__(self, task_channels, in_ch=3):
        super().__init__()
        f = FILTERS
        self.enc_in = nn.ModuleList([_block(in_ch, f[0])] + [_block(f[i], f[i + 1]) for i in range(4)])
        # stages 0 and 1 have one more conv, stages 2-4 two more (VGG-16 layout)
        self.enc_more = nn.ModuleList([_block(f[i], f[i]) if i < 2 else nn.Sequential(_block(f[i], f[i]), _block(f[i], f[i]))
                                       for i in range(5)])
        self.dec_in = nn.ModuleList([_block(f[0], f[0])] + [_block(f[i + 1], f[i]) for i in range(4)])
        # decoder level i outputs f[i-1] channels (level 0: f[0]); levels 2-4 have two more convs
        c = [f[0]] + list(f[:4])
        self.dec_more = nn.ModuleList([_block(c[i], c[i]) if i < 2 else nn.Sequential(_block(c[i], c[i]), _block(c[i], c[i]))
                                       for i in range(5)])
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(f[0], f[0], 3, padding=1), nn.Conv2d(f[0], c, 1))
                                   for c in task_channels)

    def forward(self, x):
        idx = []
        for i in range(5):
            x = self.enc_more[i](self.enc_in[i](x))
            x, ind = F.max_pool2d(x, 2, 2, return_indices=True)
            idx.append(ind)
        for i in reversed(range(5)):
            x = F.max_unpool2d(x, idx[i], 2, 2)
            x = self.dec_more[i](self.dec_in[i](x))
        return [h(x) for h in self.heads]


class MultiLeNet28(nn.Module):
    def __init__(self, task_channels, in_ch=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.fc = nn.Linear(320, 50)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, c)) for c in task_channels)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc(x.flatten(1)))
        return [h(x) for h in self.heads]


def build(arch: str, in_extra: int = 0) -> nn.Module:
    a = ARCHS[arch]
    cls = SegNet if arch.startswith("segnet") else MultiLeNet28
    return cls(a["tasks"], a["in_ch"] + in_extra)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def palora_adapter_params(model: nn.Module, T: int, r: int, layout: str) -> int:
    """Adapter parameters PaLoRA adds: per task A (r x fan-in) and B (fan-out x r) on every linear;
    conv k x k: loralib A (r k, C_in k), B (C_out k, r k); factorized A (r, C_in, k, k), B (C_out, r)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += T * r * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            k = m.kernel_size[0]
            if layout == "loralib":
                total += T * (r * k * m.in_channels * k + m.out_channels * k * r * k)
            else:
                total += T * r * (m.in_channels * k * k + m.out_channels)
    return total


def phn_params(target_params: int, T: int, pref_emb=32, chunk_emb=64, hidden=100, num_ws=24, w_dim=20000) -> int:
    chunks = math.ceil(target_params / (num_ws * w_dim))
    mlp = (pref_emb + chunk_emb) * hidden + hidden + 2 * (hidden * hidden + hidden)
    return T * pref_emb + chunks * chunk_emb + mlp + num_ws * w_dim * hidden


def counts(arch: str) -> dict:
    T = len(ARCHS[arch]["tasks"])
    base = build(arch)
    P = n_params(base)
    first_conv = next(m for m in base.modules() if isinstance(m, nn.Conv2d))
    out = {"tasks": T, "base_params": P,
           "overhead_params": {
               "palora_loralib": palora_adapter_params(base, T, RANK, "loralib"),
               "palora_factorized": palora_adapter_params(base, T, RANK, "factorized"),
               "pamal": (T - 1) * P,
               "cosmos": T * first_conv.out_channels * first_conv.kernel_size[0] * first_conv.kernel_size[1],
               "phn": phn_params(P, T) - P}}
    # check the count against the library's conversion (every conv and linear, loralib layout)
    import palora_kernels
    conv = palora_kernels.convert(build(arch), num_tasks=T, rank=RANK, lora_alpha=RANK, parameterization="loralib")
    assert n_params(conv) - P == out["overhead_params"]["palora_loralib"], arch
    return out


# -- measured peak of one training step, in a child process ------------------------------------
def _child(arch: str, method: str, threads: int) -> None:
    torch.set_num_threads(threads)
    import palora_kernels

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))
    a = ARCHS[arch]
    T = len(a["tasks"])
    N, H, W = a["small"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, a["in_ch"], H, W, generator=g)
    seg = arch.startswith("segnet")
    # segmentation / classification: class targets and cross-entropy; depth, normals: L1 on maps
    targets = [torch.randint(0, c, (N, H, W), generator=g) if seg and t == 0 else
               torch.randn(N, c, H, W, generator=g) if seg else torch.randint(0, c, (N,), generator=g)
               for t, c in enumerate(a["tasks"])]
    ray = torch.full((T,), 1.0 / T)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    torch.manual_seed(0)
    if method == "pamal":
        members = nn.ModuleList(build(arch) for _ in range(T))
        params = list(members.parameters())
        names = [n for n, _ in members[0].named_parameters()]

        def forward(inp):
            ps = [dict(m.named_parameters()) for m in members]
            mixed = {n: sum(ray[t] * ps[t][n] for t in range(T)) for n in names}
            return torch.func.functional_call(members[0], mixed, (inp,))
    elif method == "cosmos":
        net = build(arch, in_extra=T)
        params = list(net.parameters())

        def forward(inp):
            planes = ray.view(1, T, 1, 1).expand(inp.shape[0], T, inp.shape[2], inp.shape[3])
            return net(torch.cat([inp, planes], 1))
    else:
        net = build(arch)
        if method == "palora":
            palora_kernels.convert(net, num_tasks=T, rank=RANK, lora_alpha=RANK, parameterization="loralib")
            palora_kernels.set_preference(net, ray)
        params = list(net.parameters())
        forward = net
    opt = torch.optim.Adam(params, lr=1e-4)

    def step():
        outs = forward(x)
        loss = sum(ray[t] * (F.cross_entropy(o, y) if y.dtype == torch.int64 else F.l1_loss(o, y))
                   for t, (o, y) in enumerate(zip(outs, targets)))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
    step()                                      # warm-up: Adam state exists, grads stay allocated
    step()
    peak = status("VmHWM")
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def measure(arch: str, method: str, threads: int = 1) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", arch, method, str(threads)],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {arch}/{method} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-measure", action="store_true", help="parameter counts only (no training step)")
    p.add_argument("--arch", choices=tuple(ARCHS), action="append", help="default: all three")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return {}
    archs = args.arch or list(ARCHS)
    res = {}
    for arch in archs:
        c = counts(arch)
        if not args.no_measure:
            c["measured_peak_bytes"] = {m: measure(arch, m, args.threads) for m in ("base", "palora", "pamal", "cosmos")}
            c["small_input"] = ARCHS[arch]["small"]
        res[arch] = c
    _print(res)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


def _mib(b):
    return b / 2**20


def _print(res: dict) -> None:
    print(f"Parameter and training-state overhead over one plain multi-task network (PaLoRA r={RANK}, every conv "
          f"and linear; state = weights + grads + Adam, {STATE_BYTES_PER_PARAM} B/param)")
    hdr = (f"{'architecture':24s} {'T':>2s} {'base params':>12s} {'PaLoRA':>10s} {'(factor.)':>10s} {'PaMaL':>12s} "
           f"{'COSMOS':>8s} {'PHN':>12s} {'PaMaL/PaLoRA':>13s} {'PHN/PaLoRA':>11s} {'paper':>6s}")
    print(hdr)
    for arch, c in res.items():
        o = c["overhead_params"]
        pr = ARCHS[arch]["paper_ratio"]
        print(f"{arch:24s} {c['tasks']:2d} {c['base_params']:12,d} {o['palora_loralib']:10,d} "
              f"{o['palora_factorized']:10,d} {o['pamal']:12,d} {o['cosmos']:8,d} {o['phn']:12,d} "
              f"{o['pamal'] / o['palora_loralib']:12.1f}x {o['phn'] / o['palora_loralib']:10.1f}x "
              f"{(f'{pr:.1f}x' if pr else '-'):>6s}")
    print("overhead state in MiB (x16 B): " + "; ".join(
        f"{arch}: PaLoRA {_mib(c['overhead_params']['palora_loralib'] * 16):.1f}, PaMaL "
        f"{_mib(c['overhead_params']['pamal'] * 16):.1f}, PHN {_mib(c['overhead_params']['phn'] * 16):.1f}"
        for arch, c in res.items()))
    if any("measured_peak_bytes" in c for c in res.values()):
        print("\nMeasured CPU peak memory of building the model + Adam + one training step (MiB, above the RSS after "
              "imports; small input N x H x W)")
        print(f"{'architecture':24s} {'input':>12s} {'plain':>8s} {'PaLoRA':>8s} {'PaMaL':>8s} {'COSMOS':>8s} "
              f"{'PaLoRA-plain':>13s} {'PaMaL-plain':>12s} {'ratio':>6s}")
        for arch, c in res.items():
            m = c.get("measured_peak_bytes")
            if not m:
                continue
            dp, dm = m["palora"] - m["base"], m["pamal"] - m["base"]
            ratio = f"{dm / dp:.1f}x" if dp > 0 else "n/a"
            print(f"{arch:24s} {'x'.join(map(str, c['small_input'])):>12s} {_mib(m['base']):8.1f} "
                  f"{_mib(m['palora']):8.1f} {_mib(m['pamal']):8.1f} {_mib(m['cosmos']):8.1f} {_mib(dp):13.1f} "
                  f"{_mib(dm):12.1f} {ratio:>6s}")


if __name__ == "__main__":
    main()
