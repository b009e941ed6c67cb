"""Train PaLoRA on MultiDigits: one network for every trade-off between the tasks.

    PYTHONPATH=. python python/train_multidigits.py --out docs/multidigits      # the default run
    PYTHONPATH=. python python/train_multidigits.py --preset reference --out runs/ref
    torchrun --nproc_per_node=2 python/train_multidigits.py --seeds 1 --out runs/ddp  # DDP (gloo on CPU)

For each of ``--seeds`` seeds: a MultiLeNet turned into PaLoRA with palora_kernels.convert is
trained with a preference sampler (``--sampler``: by default one ray per step from the annealed
Dirichlet, as the reference's MultiMNIST configs; the paper's deterministic schedule with M rays
per step in the reference preset; linear scalarisation, optionally loss- or gradient-balanced),
the M rays of a step in ONE ray-stacked forward/backward (``--passes loop`` runs the reference's
M passes).
The baselines get the same data and the same training budget (``--budget total``: as many
image forward/backward passes as PaLoRA, see docs/training.md): a PaMaL-style weight ensemble
(T full copies mixed by the preference), linear-scalarisation nets at each evaluation weight
(the "MTL front"), the equal-weight net and one single-task net per task. Everything is
evaluated on val/test at the evaluation rays, hypervolumes are computed (errors and losses,
reference point 1), mean and sd over seeds and a paired comparison at the corner rays are
reported, the fused and reference layers' throughput and memory are measured, and everything
is written to ``<out>/multidigits.json`` and ``<out>/multidigits_front.png`` (with
``--convergence``, also ``<out>/multidigits_convergence.png``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                       # python/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))      # repo root

import palora_kernels  # noqa: E402
from palora_kernels.samplers import SAMPLERS, EndGridSampler, make_sampler, ray_grid  # noqa: E402
from multidigits.data import LAYOUTS, make_multidigits, num_classes, source_indices  # noqa: E402
from multidigits.nets import MultiLeNet  # noqa: E402
from multidigits.pareto import hypervolume  # noqa: E402
from multidigits.training import (Dist, WeightEnsemble, ensemble_loss, evaluate, palora_loss,  # noqa: E402
                                  steps_per_epoch, train, weighted_loss)

# Presets: values of the flags left unset. "tuned" is this project's default: one ray per step from the
# annealed Dirichlet (the reference's MultiMNIST configs set num: 1), 20 epochs = 1,860 steps, the same
# 238,080 image passes as 4 epochs of 5 annealed rays. Chosen on val (docs/training.md, "Why the
# corners"): 5 rays per step spend the budget in 372 Adam steps and left the corners 12-13 points
# below the single-task nets (930 steps each). "reference" keeps the reference's layer settings
# (loralib conv adapters, r=1, alpha=1, adapter lr x T, Adam 1e-3, batch 256) with M=5 annealed rays
# (the 3-task grid rounds 5 up to 6).
PRESETS = {
    "tuned": dict(epochs=20, batch_size=128, lr=2e-3, rank=2, lora_alpha=2.0, conv_layout="factorized",
                  adapter_lr_mult=None, rays=1, sampler="dirichlet", dirichlet_floor=0.001, dirichlet_power=1.0,
                  end_grid=0.0, adapter_lr_decay=0.0),
    "reference": dict(epochs=4, batch_size=256, lr=1e-3, rank=1, lora_alpha=1.0, conv_layout="loralib",
                      adapter_lr_mult=None, rays=5, sampler="annealed", dirichlet_floor=0.001, dirichlet_power=1.0,
                      end_grid=0.0, adapter_lr_decay=0.0),
}
PRESET_ADAPTER_LR_X_T = {"tuned": True, "reference": True}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="tuned",
                   help="defaults for the flags below that are not given (docs/training.md)")
    p.add_argument("--tasks", type=int, choices=(2, 3), default=2,
                   help="2: left and right digit; 3: adds the parity of their sum")
    p.add_argument("--data", choices=tuple(LAYOUTS), default="hard",
                   help="hard: 12x12 canvas, heavy overlap (default); easy: the original 14x14 layout")
    p.add_argument("--epochs", type=int, default=None,
                   help="PaLoRA epochs (tuned: 20 of one ray, reference: 4 of 5 rays; the same image passes at batch 128)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (split over DDP ranks)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--adapter-lr-mult", type=float, default=None,
                   help="adapters' lr = lr x this (both presets: T, the reference's reweight_lr)")
    p.add_argument("--adapter-lr-decay", type=float, default=None,
                   help="the adapters' lr falls linearly to 0 over this final fraction of the PaLoRA steps (0: off)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank per task")
    p.add_argument("--lora-alpha", type=float, default=None, help="adapter scale = lora_alpha / rank")
    p.add_argument("--conv-layout", choices=("factorized", "loralib"), default=None,
                   help="conv adapter parameterization (reference: loralib)")
    p.add_argument("--rays", type=int, default=None, help="M rays per training step")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="annealed: the paper's deterministic schedule (reference preset); dirichlet: annealed "
                        "Dirichlet alpha = 1 - t + 0.001 (tuned preset); random: Dirichlet(1), uniform on the simplex")
    p.add_argument("--dirichlet-floor", type=float, default=None,
                   help="--sampler dirichlet: alpha(t) = (1 - t)^power + floor (the reference: floor 0.001)")
    p.add_argument("--dirichlet-power", type=float, default=None,
                   help="--sampler dirichlet: the power of (1 - t) in alpha(t) (the reference: 1)")
    p.add_argument("--end-grid", type=float, default=None,
                   help="fraction of the PaLoRA (and PaMaL) steps at the end that train the evaluation rays "
                        "in turn instead of the sampler's rays (0: off)")
    p.add_argument("--balance", choices=("none", "lb", "gb"), default="none",
                   help="PaLoRA's loss (lb) or gradient (gb, one pass per ray) balancing")
    p.add_argument("--seeds", type=int, default=3, help="run everything this many times (seeds seed..seed+N-1)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--budget", choices=("total", "per-net"), default="total",
                   help="total: every baseline method gets PaLoRA's number of image passes in all; "
                        "per-net: every baseline net gets PaLoRA's number of steps")
    p.add_argument("--ls-rays", type=int, default=None,
                   help="linear-scalarisation nets per edge of the weight grid (default: --eval-rays for "
                        "2 tasks, 4 (10 nets) for 3)")
    p.add_argument("--out", default="runs/multidigits", help="directory for the JSON and the PNG")
    p.add_argument("--backend", default=None, help="palora backend of the fused layers (default: automatic)")
    p.add_argument("--impl", choices=("fused", "unfused"), default="fused",
                   help="unfused: palora_kernels backend 'reference' (the loop over adapters)")
    p.add_argument("--passes", choices=("stacked", "loop"), default="stacked",
                   help="stacked: the M rays in one pass; loop: one pass per ray (the reference)")
    p.add_argument("--batchnorm", action="store_true", help="RayGroupBatchNorm2d after each conv")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--val-size", type=int, default=None)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--eval-rays", type=int, default=11, help="rays per edge of the evaluation grid")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--no-bench", action="store_true", help="skip the fused vs unfused measurement")
    p.add_argument("--convergence", action="store_true",
                   help="also train PaLoRA with --sampler random (first seed) and plot hypervolume per epoch")
    p.add_argument("--bench-steps", type=int, default=3)
    p.add_argument("--bench-rays", type=int, default=5,
                   help="rays per step of the fused vs unfused measurement (annealed schedule, >= 2)")
    p.add_argument("--bench-rounds", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=None, help="stop PaLoRA training after this many steps")
    p.add_argument("--save-weights", default=None, help="write the trained PaLoRA state_dict (first seed) here")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (1: 2 threads under load from other processes "
                        "ran up to 20x slower here, OpenMP spin-waits)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.adapter_lr_mult is None:
        args.adapter_lr_mult = float(args.tasks) if PRESET_ADAPTER_LR_X_T[args.preset] else 1.0
    if args.impl == "unfused" and args.backend not in (None, "reference"):
        p.error(f"--impl unfused runs backend 'reference'; got --backend {args.backend}")
    for name in ("epochs", "batch_size", "rays", "seeds", "rank", "eval_rays"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.sampler == "annealed" and args.rays < 2:
        p.error(f"--rays: expected >= 2 with --sampler annealed (use dirichlet or random for one ray per "
                f"step), got {args.rays}")
    if not 0.0 <= args.adapter_lr_decay <= 1.0:
        p.error(f"--adapter-lr-decay: expected 0 <= fraction <= 1, got {args.adapter_lr_decay}")
    if not 0.0 <= args.end_grid < 1.0:
        p.error(f"--end-grid: expected 0 <= fraction < 1, got {args.end_grid}")
    if args.dirichlet_floor <= 0 or args.dirichlet_power <= 0:
        p.error(f"--dirichlet-floor/--dirichlet-power: expected > 0, got {args.dirichlet_floor}/{args.dirichlet_power}")
    if args.ls_rays is None:
        args.ls_rays = args.eval_rays if args.tasks == 2 else 4
    return args


def setup_dist(args) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if want_cuda else "cpu"))
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if want_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if want_cuda else "cpu"))


def wrap(model, dist: Dist):
    if dist.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def unwrap(model):
    return getattr(model, "module", model)


def log(dist: Dist, msg: str) -> None:
    if dist.main:
        print(msg, flush=True)


def corner_index(rays: torch.Tensor, t: int) -> int:
    hit = [i for i, r in enumerate(rays.tolist()) if r[t] == 1.0]
    assert len(hit) == 1, f"ray grid has no single corner for task {t}"
    return hit[0]


def _hv(points, T):
    """Both hypervolume forms of a set of per-task (errors, losses) points, reference point 1."""
    errs = [[1 - a for a in p["accuracy"]] for p in points]
    losses = [p["loss"] for p in points]
    return {"errors": hypervolume(errs, [1.0] * T)[0], "losses": hypervolume(losses, [1.0] * T)[0]}


def _front_hv(entries, T, split="test") -> dict:
    """Front HV and the best single point's HV of a list of {split: metrics} entries."""
    pts = [e[split] for e in entries]
    front = _hv(pts, T)
    singles = [_hv([p], T) for p in pts]
    return {"front": front, "best_single": {k: max(s[k] for s in singles) for k in ("errors", "losses")}}


def _sweep(model, data, rays, dev, backend=None, splits=("val", "test")):
    out = []
    with palora_kernels.use_backend(backend):
        for ray in rays:
            out.append({"ray": ray.tolist(),
                        **{s: evaluate(model, data[s].images, data[s].labels, ray, device=dev) for s in splits}})
    return out


def build_sampler(args, kind: str, steps: int, seed: int):
    """The training sampler of PaLoRA and PaMaL: ``kind`` with the preset's Dirichlet floor/power, and
    with --end-grid the last fraction of the steps on the evaluation rays in turn."""
    T = args.tasks
    kw = dict(floor=args.dirichlet_floor, power=args.dirichlet_power) if kind == "dirichlet" else {}
    sampler = make_sampler(kind, T, args.rays, steps, seed=seed, **kw)
    if args.end_grid > 0:
        start = steps - int(round(args.end_grid * steps))
        sampler = EndGridSampler(sampler, ray_grid(T, args.eval_rays, torch.float64), start, seed=seed)
    return sampler


def adapter_lr_schedule(fraction: float, steps: int):
    """--adapter-lr-decay: 1 until the last ``fraction`` of the steps, then linear to 0 (None: off)."""
    if fraction <= 0:
        return None
    n = max(1, round(fraction * steps))
    return lambda step: min(1.0, (steps - step) / n)


def _train_palora(args, seed, data, dist, sampler_kind, backend, common, steps, per_epoch_hv):
    T, classes = args.tasks, num_classes(args.tasks)
    torch.manual_seed(seed)
    net = MultiLeNet(classes, batchnorm=args.batchnorm, image_size=data["train"].images.shape[-1])
    palora_kernels.convert(net, num_tasks=T, rank=args.rank, lora_alpha=args.lora_alpha,
                           parameterization=args.conv_layout)
    net = wrap(net.to(dist.device), dist)
    sampler = build_sampler(args, sampler_kind, steps, seed)
    curve = []
    eval_rays = ray_grid(T, args.eval_rays)

    def on_epoch_end(epoch, step):
        if per_epoch_hv and dist.main:
            sw = _sweep(unwrap(net), data, eval_rays, dist.device, backend)
            curve.append({"epoch": epoch + 1, "step": step,
                          **{s: _hv([r[s] for r in sw], T) for s in ("val", "test")}})
    tr = data["train"]
    res = train(net, tr.images, tr.labels,
                palora_loss(sampler, stacked=args.passes == "stacked", balance=args.balance, num_tasks=T),
                max_steps=steps, backend=backend, adapter_lr_mult=args.adapter_lr_mult,
                adapter_lr_scale=adapter_lr_schedule(args.adapter_lr_decay, steps),
                on_epoch_end=on_epoch_end,
                desc=f"seed {seed} PaLoRA {sampler_kind} M={sampler.num_rays}", **common)
    return unwrap(net), sampler, res, curve


def run_seed(args, seed, data, dist, backend, progress) -> dict:
    T, classes = args.tasks, num_classes(args.tasks)
    tr = data["train"]
    side = tr.images.shape[-1]
    dev = dist.device
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed, dist=dist,
                  progress=progress)
    steps = args.epochs * steps_per_epoch(len(tr), args.batch_size)
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)
    out = {"seed": seed}
    # hypervolume per epoch (11 rays on val and test after every epoch) only for the convergence plot
    model, sampler, res, curve = _train_palora(args, seed, data, dist, args.sampler, backend, common, steps,
                                               per_epoch_hv=args.convergence and seed == args.seed
                                               and not args.no_eval)
    M = sampler.num_rays
    passes = steps * args.batch_size * M          # image forward/backward passes: the training budget
    out["palora"] = {"train": {"steps": res.steps, "rays_per_step": M, "image_passes": passes,
                               "seconds": res.seconds, "images_per_s": res.images_per_s,
                               "last_loss": res.last_loss, "history": res.history},
                     "hv_per_epoch": curve}
    out["_model"], out["_sampler"], out["_steps"] = model, sampler, steps

    eval_rays = ray_grid(T, args.eval_rays)
    if not args.no_eval and dist.main:
        out["palora"]["rays"] = _sweep(model, data, eval_rays, dev, backend)

    if not args.no_baselines:
        def net_steps(n_nets, passes_per_step=1):
            if args.budget == "per-net":
                return steps
            return max(1, round(passes / (n_nets * args.batch_size * passes_per_step)))

        def plain(heads, s):
            torch.manual_seed(s)
            return MultiLeNet(heads, batchnorm=args.batchnorm, image_size=side)

        base = {}
        # PaMaL-style weight ensemble: same sampler, same steps, M rays per step -> same passes
        torch.manual_seed(seed + 1)
        ens = WeightEnsemble(lambda: MultiLeNet(classes, batchnorm=args.batchnorm, image_size=side), T).to(dev)
        r = train(ens, tr.images, tr.labels, ensemble_loss(build_sampler(args, args.sampler, steps, seed)),
                  max_steps=steps, desc=f"seed {seed} PaMaL ensemble", **common)
        base["pamal"] = {"steps": r.steps, "seconds": r.seconds}
        if dist.main and not args.no_eval:
            base["pamal"]["rays"] = _sweep(ens, data, eval_rays, dev)
        # linear scalarisation: one net per weight of the grid
        ls_w = ray_grid(T, args.ls_rays)
        n_ls = net_steps(len(ls_w))
        base["ls_front"] = {"steps_per_net": n_ls, "nets": []}
        for i, w in enumerate(ls_w):
            net = wrap(plain(classes, seed * 1000 + 10 + i).to(dev), dist)
            r = train(net, tr.images, tr.labels, weighted_loss(w), max_steps=n_ls,
                      desc=f"seed {seed} LS {i + 1}/{len(ls_w)}", **common)
            e = {"ray": w.tolist(), "seconds": r.seconds}
            if dist.main and not args.no_eval:
                e.update({s: evaluate(unwrap(net), data[s].images, data[s].labels, device=dev) for s in ("val", "test")})
            base["ls_front"]["nets"].append(e)
        # equal weight: one net, the whole budget
        n_ew = net_steps(1)
        net = wrap(plain(classes, seed * 1000 + 1).to(dev), dist)
        r = train(net, tr.images, tr.labels, weighted_loss(torch.full((T,), 1.0 / T)), max_steps=n_ew,
                  desc=f"seed {seed} equal-weight", **common)
        base["equal_weight"] = {"steps": n_ew, "seconds": r.seconds}
        if dist.main and not args.no_eval:
            base["equal_weight"].update({s: evaluate(unwrap(net), data[s].images, data[s].labels, device=dev)
                                         for s in ("val", "test")})
        # single task: T nets sharing the budget
        n_st = net_steps(T)
        base["single_task"] = []
        for t in range(T):
            net = wrap(plain([classes[t]], seed * 1000 + 2 + t).to(dev), dist)
            r = train(net, tr.images, tr.labels, weighted_loss(torch.ones(1), tasks=[t]), max_steps=n_st,
                      desc=f"seed {seed} single-task {t + 1}", **common)
            e = {"task": t, "steps": n_st, "seconds": r.seconds}
            if dist.main and not args.no_eval:
                e.update({s: evaluate(unwrap(net), data[s].images, data[s].labels[:, [t]], device=dev)
                          for s in ("val", "test")})
            base["single_task"].append(e)
        out["baselines"] = base

    if not args.no_eval and dist.main:
        out["hypervolume"] = _seed_hv(out, T)
    return out


def _seed_hv(out: dict, T: int) -> dict:
    hv = {"palora": _front_hv(out["palora"]["rays"], T)}
    b = out.get("baselines")
    if b:
        hv["pamal"] = _front_hv(b["pamal"]["rays"], T)
        hv["ls_front"] = _front_hv(b["ls_front"]["nets"], T)
        hv["equal_weight"] = _hv([b["equal_weight"]["test"]], T)
        st = b["single_task"]
        ideal = {"accuracy": [s["test"]["accuracy"][0] for s in st], "loss": [s["test"]["loss"][0] for s in st]}
        hv["single_task_ideal_point"] = _hv([ideal], T)
    return hv


def _ms(xs) -> dict:
    xs = [float(x) for x in xs]
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def monotone_check(seeds: list, split: str) -> dict:
    """Monotonicity of the 2-task front on ``split``: of the mean front over seeds (violations, the
    largest, and the end steps: each task's accuracy at its corner minus at the next ray, the
    steps a flat end makes small) and of every seed's own front (violations summed over seeds)."""
    def steps(acc):          # acc: per ray (task 1 weight rising) [a1, a2]; > 0 = the right direction
        return ([acc[i][0] - acc[i - 1][0] for i in range(1, len(acc))],
                [acc[i - 1][1] - acc[i][1] for i in range(1, len(acc))])
    n = len(seeds[0]["palora"]["rays"])
    mean = [[statistics.fmean(s["palora"]["rays"][i][split]["accuracy"][t] for s in seeds) for t in range(2)]
            for i in range(n)]
    s1, s2 = steps(mean)
    viol = [max(0.0, -d) for d in s1 + s2]
    per_seed = 0
    for s in seeds:
        a1, a2 = steps([s["palora"]["rays"][i][split]["accuracy"] for i in range(n)])
        per_seed += sum(d < 0 for d in a1 + a2)
    return {"max_violation": max(viol), "violations": sum(v > 0 for v in viol), "checked_pairs": len(viol),
            "end_steps": [s1[-1], s2[0]], "per_seed_violations": per_seed}


def summarise(seeds: list, T: int) -> dict:
    """Mean and sd over seeds; paired comparison at the corner rays; the acceptance checks."""
    if not seeds or "hypervolume" not in seeds[0]:
        return {}
    summ = {"hypervolume": {}}
    for method in seeds[0]["hypervolume"]:
        h0 = seeds[0]["hypervolume"][method]
        if "front" in h0:
            summ["hypervolume"][method] = {part: {k: _ms([s["hypervolume"][method][part][k] for s in seeds])
                                                  for k in ("errors", "losses")} for part in ("front", "best_single")}
        else:
            summ["hypervolume"][method] = {k: _ms([s["hypervolume"][method][k] for s in seeds])
                                           for k in ("errors", "losses")}
    rays = seeds[0]["palora"]["rays"]
    mean_front = [{"ray": r["ray"], "test_accuracy": [statistics.fmean(s["palora"]["rays"][i]["test"]["accuracy"][t]
                                                                       for s in seeds) for t in range(T)]}
                  for i, r in enumerate(rays)]
    summ["palora_mean_front"] = mean_front
    # monotone in the preference (2 tasks: the 11 rays in order, task 1's weight rising): task 1's mean
    # accuracy must not fall and task 2's must not rise; test (the acceptance) and val (for choices)
    if T == 2:
        summ["monotone"] = monotone_check(seeds, "test")
        summ["monotone_val"] = monotone_check(seeds, "val")
    corners = []
    if "baselines" in seeds[0]:
        grid = torch.tensor([r["ray"] for r in rays])
        for t in range(T):
            ci = corner_index(grid, t)
            pal = [s["palora"]["rays"][ci]["test"]["accuracy"][t] for s in seeds]
            st = [s["baselines"]["single_task"][t]["test"]["accuracy"][0] for s in seeds]
            pam = [s["baselines"]["pamal"]["rays"][ci]["test"]["accuracy"][t] for s in seeds]
            diff = [a - b for a, b in zip(pal, st)]
            d = _ms(diff)
            tstat = d["mean"] / (d["sd"] / math.sqrt(len(diff))) if len(diff) > 1 and d["sd"] > 0 else None
            corners.append({"task": t, "palora": _ms(pal), "single_task": _ms(st), "pamal": _ms(pam),
                            "paired_diff_palora_minus_single": d, "paired_t": tstat,
                            "within_1sd_or_better": d["mean"] >= -_ms(st)["sd"]})
        summ["corners"] = corners
        pf = [s["hypervolume"]["palora"]["front"]["errors"] for s in seeds]
        lf = [s["hypervolume"]["ls_front"]["front"]["errors"] for s in seeds]
        summ["front_vs_ls_front_errors"] = _ms([a - b for a, b in zip(pf, lf)])
        pl = [s["hypervolume"]["palora"]["front"]["losses"] for s in seeds]
        ll = [s["hypervolume"]["ls_front"]["front"]["losses"] for s in seeds]
        summ["front_vs_ls_front_losses"] = _ms([a - b for a, b in zip(pl, ll)])
    return summ


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dist = setup_dist(args)
    T, classes = args.tasks, num_classes(args.tasks)
    backend = "reference" if args.impl == "unfused" else args.backend
    progress = not args.no_progress

    # the data is fixed (seed 0) so that seeds vary only the initialisation, the batch order and the
    # random rays: the paired comparison is then about training randomness alone
    data = {s: make_multidigits(s, getattr(args, f"{s}_size"), T, seed=0, layout=args.data)
            for s in ("train", "val", "test")}
    tr = data["train"]
    log(dist, f"MultiDigits ({args.data}): train {len(tr)}, val {len(data['val'])}, test {len(data['test'])} "
              f"images ({T} tasks); preset {args.preset}; {args.seeds} seed(s); world {dist.world}, "
              f"device {dist.device}, threads {args.threads}")
    result = {
        "config": {**vars(args), "world_size": dist.world, "device": str(dist.device),
                   "torch": torch.__version__, "python": platform.python_version(),
                   "cpu_count": os.cpu_count(), "classes": classes, "platform": platform.platform(),
                   "cpu": _cpu_name()},
        "data": {s: {"images": len(d), "sha256": d.digest(), "source_digits": int(len(source_indices(s))),
                     "layout": args.data} for s, d in data.items()},
        "seeds": [], "timing_s": {},
    }
    models = []
    for k in range(args.seeds):
        t0 = time.perf_counter()
        r = run_seed(args, args.seed + k, data, dist, backend, progress)
        models.append((r.pop("_model"), r.pop("_sampler"), r.pop("_steps")))
        r["seconds"] = time.perf_counter() - t0
        result["seeds"].append(r)
        if k == 0 and args.save_weights and dist.main:
            torch.save({n: v.detach().cpu() for n, v in models[0][0].state_dict().items()}, args.save_weights)
    if not dist.main:
        _finish(dist)
        return result

    if args.convergence and not args.no_eval:
        t0 = time.perf_counter()
        common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, dist=dist,
                      progress=progress)
        other = "random" if args.sampler != "random" else "annealed"
        _, _, res, curve = _train_palora(args, args.seed, data, dist, other, backend, common, models[0][2], True)
        result["convergence"] = {args.sampler: result["seeds"][0]["palora"]["hv_per_epoch"], other: curve}
        result["timing_s"]["convergence"] = time.perf_counter() - t0

    if not args.no_eval:
        result["summary"] = summarise(result["seeds"], T)

    if not args.no_bench and dist.world == 1:
        from multidigits.bench import measure
        t0 = time.perf_counter()
        model, sampler, steps = models[0]
        log(dist, f"measuring fused vs unfused: {args.bench_rounds} rounds x {args.bench_steps} steps each ...")
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(tr), generator=g)[:args.batch_size]
        x, y = tr.images[idx].to(dist.device), tr.labels[idx].to(dist.device)
        bench_rays = make_sampler("annealed", T, max(args.bench_rays, 2), steps)(steps // 2, device=dist.device)
        result["throughput_memory"] = {
            "batch_images": args.batch_size, "rays": bench_rays.shape[0],
            "ray_rows": args.batch_size * bench_rays.shape[0], "threads": args.threads, "device": str(dist.device),
            "configs": measure(model, x, y, bench_rays, steps=args.bench_steps,
                               rounds=args.bench_rounds, fused_backend=args.backend, threads=args.threads)}
        result["timing_s"]["bench"] = time.perf_counter() - t0

    result["timing_s"]["seeds"] = [s["seconds"] for s in result["seeds"]]
    result["timing_s"]["total"] = time.perf_counter() - t_start
    add_acceptance(result)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "multidigits.json"), "w") as f:
        json.dump(result, f, indent=1)
    if result.get("summary") and "baselines" in result["seeds"][0]:
        from multidigits.plot import plot_front
        plot_front(result, os.path.join(args.out, "multidigits_front.png"))
    if "convergence" in result:
        from multidigits.plot import plot_convergence
        plot_convergence(result, os.path.join(args.out, "multidigits_convergence.png"))
    _summary(result)
    _finish(dist)
    return result


def add_acceptance(result: dict) -> None:
    """The issue's acceptance checks, from the summary over seeds."""
    summ = result.get("summary") or {}
    if "corners" not in summ:
        return
    T = result["config"]["tasks"]
    hvp, hvl = summ["hypervolume"]["palora"]["front"], summ["hypervolume"]["ls_front"]["front"]
    result["acceptance"] = {
        "monotone_front_on_test": summ.get("monotone", {}).get("violations") == 0 if T == 2 else None,
        "corners_within_1sd_of_single_task_or_better": all(c["within_1sd_or_better"] for c in summ["corners"]),
        "front_hv_errors_palora_minus_ls_front": summ["front_vs_ls_front_errors"]["mean"],
        "front_hv_errors_beats_ls_front": hvp["errors"]["mean"] > hvl["errors"]["mean"],
        "front_hv_losses_beats_ls_front": hvp["losses"]["mean"] > hvl["losses"]["mean"],
        "total_minutes": result["timing_s"]["total"] / 60,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
                    isa = "avx512f" if "avx512f" in flags else ("avx2" if "avx2" in flags else "other")
                    return f"{name} ({isa})"
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fmt(m: dict, scale: float = 1.0, nd: int = 4) -> str:
    return f"{m['mean'] * scale:.{nd}f} +- {m['sd'] * scale:.{nd}f}"


def _summary(result: dict) -> None:
    summ = result.get("summary") or {}
    if "palora_mean_front" in summ:
        print(f"ray -> mean test accuracy per task over {len(result['seeds'])} seed(s)")
        for r in summ["palora_mean_front"]:
            print("  " + " ".join(f"{v:.2f}" for v in r["ray"]) + " -> " +
                  " ".join(f"{a:.4f}" for a in r["test_accuracy"]))
    if "hypervolume" in summ:
        for method, h in summ["hypervolume"].items():
            if "front" in h:
                print(f"hypervolume of errors / losses, {method:12s} front {_fmt(h['front']['errors'])} / "
                      f"{_fmt(h['front']['losses'])}; best single ray {_fmt(h['best_single']['errors'])}")
            else:
                print(f"hypervolume of errors / losses, {method:12s} {_fmt(h['errors'])} / {_fmt(h['losses'])}")
    for c in summ.get("corners", []):
        print(f"corner task {c['task'] + 1}: PaLoRA {_fmt(c['palora'])}, single-task {_fmt(c['single_task'])}, "
              f"paired diff {_fmt(c['paired_diff_palora_minus_single'])}")
    if "acceptance" in result:
        print("acceptance:", json.dumps(result["acceptance"]))
    if "throughput_memory" in result:
        for name, c in result["throughput_memory"]["configs"].items():
            mem = c.get("cuda_peak_step_bytes", c.get("cpu_peak_rss_growth_bytes", 0)) / 2**20
            print(f"  {name:16s} {c['images_per_s']:8.0f} images/s  saved-for-backward "
                  f"{c['saved_for_backward_bytes'] / 2**20:6.1f} MiB  step peak {mem:6.1f} MiB")
    print(f"total {result['timing_s']['total']:.1f} s")


def _finish(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as d
        d.destroy_process_group()


if __name__ == "__main__":
    main()
