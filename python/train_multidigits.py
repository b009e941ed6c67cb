"""Train PaLoRA on MultiDigits: one network for every trade-off between the tasks.

    PYTHONPATH=. python python/train_multidigits.py --out docs              # the default run
    torchrun --nproc_per_node=2 python/train_multidigits.py --out runs/ddp  # DDP (gloo on CPU)

A MultiLeNet turned into PaLoRA with palora_kernels.convert is trained with the paper's
annealing sampler (M rays per step, linear scalarisation, Adam), the M rays of a step in
ONE ray-stacked forward/backward (``--passes loop`` runs the reference's M passes). Then:
the ray grid is swept on val/test (per-task accuracy and loss per ray), the hypervolume of
the front is computed, the baselines (one single-task net per task and the plain
equal-weight multi-task net, same epochs) are trained and evaluated, training throughput
and memory of the fused and the reference (unfused) layers are measured side by side, and
everything is written to ``<out>/multidigits.json`` and ``<out>/multidigits_front.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                       # python/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))      # repo root

import palora_kernels  # noqa: E402
from palora_kernels.samplers import AnnealedRaySampler, ray_grid  # noqa: E402
from multidigits.data import make_multidigits, num_classes, source_indices  # noqa: E402
from multidigits.nets import MultiLeNet  # noqa: E402
from multidigits.pareto import hypervolume  # noqa: E402
from multidigits.training import (Dist, evaluate, loss_reference_point, palora_loss, train,  # noqa: E402
                                  weighted_loss)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, choices=(2, 3), default=2,
                   help="2: left and right digit; 3: adds the parity of their sum")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128, help="global batch (split over DDP ranks)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=2, help="LoRA rank per task")
    p.add_argument("--lora-alpha", type=float, default=2.0, help="adapter scale = lora_alpha / rank")
    p.add_argument("--rays", type=int, default=5, help="M rays per training step")
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--bench-steps", type=int, default=3)
    p.add_argument("--bench-rounds", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=None, help="stop PaLoRA training after this many steps")
    p.add_argument("--save-weights", default=None, help="write the trained PaLoRA state_dict here")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (1: 2 threads under load from other processes "
                        "ran up to 20x slower here, OpenMP spin-waits)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.impl == "unfused" and args.backend not in (None, "reference"):
        p.error(f"--impl unfused runs backend 'reference'; got --backend {args.backend}")
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


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dist = setup_dist(args)
    T, classes = args.tasks, num_classes(args.tasks)
    backend = "reference" if args.impl == "unfused" else args.backend
    progress = not args.no_progress

    data = {s: make_multidigits(s, getattr(args, f"{s}_size"), T, seed=args.seed) for s in ("train", "val", "test")}
    tr = data["train"]
    log(dist, f"MultiDigits: train {len(tr)}, val {len(data['val'])}, test {len(data['test'])} images "
              f"({T} tasks); world {dist.world}, device {dist.device}, threads {args.threads}")
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, dist=dist,
                  progress=progress)
    steps_total = args.epochs * (len(tr) // args.batch_size)
    if args.max_steps is not None:
        steps_total = min(steps_total, args.max_steps)

    # -- PaLoRA ------------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    net = MultiLeNet(classes, batchnorm=args.batchnorm)
    palora_kernels.convert(net, num_tasks=T, rank=args.rank, lora_alpha=args.lora_alpha)
    net = wrap(net.to(dist.device), dist)
    sampler = AnnealedRaySampler(T, args.rays, steps_total)
    res = train(net, tr.images, tr.labels, palora_loss(sampler, stacked=args.passes == "stacked"),
                max_steps=args.max_steps, backend=backend,
                desc=f"PaLoRA {args.impl}/{args.passes} M={args.rays}", **common)
    palora_model = unwrap(net)
    if args.save_weights and dist.main:
        torch.save({k: v.detach().cpu() for k, v in palora_model.state_dict().items()}, args.save_weights)
    result = {
        "config": {**vars(args), "world_size": dist.world, "device": str(dist.device),
                   "torch": torch.__version__, "python": platform.python_version(),
                   "cpu_count": os.cpu_count(), "steps": res.steps, "classes": classes},
        "data": {s: {"images": len(d), "sha256": d.digest(), "source_digits": int(len(source_indices(s)))}
                 for s, d in data.items()},
        "palora": {"train": {"steps": res.steps, "seconds": res.seconds, "images_per_s": res.images_per_s,
                             "ray_rows_per_s": res.images_per_s * args.rays, "last_loss": res.last_loss,
                             "history": res.history}},
        "timing_s": {"palora_train": res.seconds},
    }

    # -- baselines (same epochs, batch, optimizer) -------------------------------------------
    baselines = {"single_task": [], "equal_weight": None}
    if not args.no_baselines:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed + 1)
        ew = wrap(MultiLeNet(classes, batchnorm=args.batchnorm).to(dist.device), dist)
        r = train(ew, tr.images, tr.labels, weighted_loss(torch.full((T,), 1.0 / T)),
                  desc="equal-weight MTL", **common)
        baselines["equal_weight"] = {"model": unwrap(ew), "train_seconds": r.seconds}
        for t in range(T):
            torch.manual_seed(args.seed + 2 + t)
            st = wrap(MultiLeNet([classes[t]], batchnorm=args.batchnorm).to(dist.device), dist)
            r = train(st, tr.images, tr.labels, weighted_loss(torch.ones(1), tasks=[t]),
                      desc=f"single-task {t + 1}", **common)
            baselines["single_task"].append({"task": t, "model": unwrap(st), "train_seconds": r.seconds})
        result["timing_s"]["baselines_train"] = time.perf_counter() - t0

    if not dist.main:
        _finish(dist)
        return result

    # -- evaluation ----------------------------------------------------------------------------
    if not args.no_eval:
        t0 = time.perf_counter()
        dev = dist.device
        rays = ray_grid(T, args.eval_rays)
        sweep = []
        with palora_kernels.use_backend(backend):
            for ray in rays:
                entry = {"ray": ray.tolist()}
                for s in ("val", "test"):
                    entry[s] = evaluate(palora_model, data[s].images, data[s].labels, ray, device=dev)
                sweep.append(entry)
        result["palora"]["rays"] = sweep
        corners = [sweep[corner_index(rays, t)]["test"]["accuracy"][t] for t in range(T)]
        result["palora"]["corner_test_accuracy"] = corners

        out_b = {"single_task": [], "equal_weight": None}
        if baselines["equal_weight"] is not None:
            m = baselines["equal_weight"]
            out_b["equal_weight"] = {s: evaluate(m["model"], data[s].images, data[s].labels, device=dev)
                                     for s in ("val", "test")}
            out_b["equal_weight"]["train_seconds"] = m["train_seconds"]
            for st in baselines["single_task"]:
                t = st["task"]
                e = {s: evaluate(st["model"], data[s].images, data[s].labels[:, [t]], device=dev)
                     for s in ("val", "test")}
                out_b["single_task"].append({"task": t, **e, "train_seconds": st["train_seconds"]})
        result["baselines"] = out_b
        result["hypervolume"] = _hypervolumes(result, classes)
        result["timing_s"]["evaluation"] = time.perf_counter() - t0

    # -- fused vs unfused, same run ------------------------------------------------------------
    if not args.no_bench and dist.world == 1:
        from multidigits.bench import measure
        t0 = time.perf_counter()
        log(dist, f"measuring fused vs unfused: {args.bench_rounds} rounds x {args.bench_steps} steps each ...")
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(tr), generator=g)[:args.batch_size]
        x, y = tr.images[idx].to(dist.device), tr.labels[idx].to(dist.device)
        bench_rays = sampler(steps_total // 2, device=dist.device)     # mid-schedule rays
        result["throughput_memory"] = {
            "batch_images": args.batch_size, "rays": args.rays, "ray_rows": args.batch_size * args.rays,
            "threads": args.threads, "device": str(dist.device),
            "configs": measure(palora_model, x, y, bench_rays, steps=args.bench_steps,
                               rounds=args.bench_rounds, fused_backend=args.backend, threads=args.threads)}
        result["timing_s"]["bench"] = time.perf_counter() - t0

    result["timing_s"]["total"] = time.perf_counter() - t_start
    if "hypervolume" in result:
        hv = result["hypervolume"]
        result["acceptance"] = {
            "corner_test_accuracy": result["palora"]["corner_test_accuracy"],
            "corner_accuracy_at_least_0.9": all(a >= 0.9 for a in result["palora"]["corner_test_accuracy"]),
            "hv_errors_above_equal_weight": hv["errors"]["palora"] > hv["errors"]["equal_weight"],
            "hv_losses_above_equal_weight": hv["losses"]["palora"] > hv["losses"]["equal_weight"],
            "total_minutes": result["timing_s"]["total"] / 60,
        }
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "multidigits.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    if "rays" in result["palora"] and result["baselines"]["equal_weight"] is not None:
        from multidigits.plot import plot_front
        plot_front(result, os.path.join(args.out, "multidigits_front.png"))
    _summary(result)
    _finish(dist)
    return result


def _hypervolumes(result: dict, classes) -> dict:
    T = len(classes)
    rays = result["palora"]["rays"]
    ew = result["baselines"]["equal_weight"]
    out = {}
    for kind, ref, metric in (("errors", [1.0] * T, lambda m: [1 - a for a in m["accuracy"]]),
                              ("losses", loss_reference_point(classes), lambda m: m["loss"])):
        pts = [metric(r["test"]) for r in rays]
        hv, impl = hypervolume(pts, ref)
        entry = {"ref": ref, "palora": hv, "implementation": impl,
                 "palora_val": hypervolume([metric(r["val"]) for r in rays], ref)[0]}
        if ew is not None:
            entry["equal_weight"] = hypervolume([metric(ew["test"])], ref)[0]
            entry["equal_weight_val"] = hypervolume([metric(ew["val"])], ref)[0]
        stl = result["baselines"]["single_task"]
        if len(stl) == T:
            # the ideal point of T separate networks (not reachable by one net; an upper reference)
            entry["single_task_ideal_point"] = hypervolume([[metric(s["test"])[0] for s in stl]], ref)[0]
        out[kind] = entry
    out["reference_point"] = ("errors: 1 - accuracy per task, reference 1 (every task); losses: mean test "
                              "cross-entropy per task, reference ln(C_t) = the loss of a uniform prediction")
    return out


def _summary(result: dict) -> None:
    if "rays" in result["palora"]:
        print("ray -> test accuracy per task")
        for r in result["palora"]["rays"]:
            print("  " + " ".join(f"{v:.2f}" for v in r["ray"]) + " -> " +
                  " ".join(f"{a:.4f}" for a in r["test"]["accuracy"]))
    base = result.get("baselines", {})
    if base.get("equal_weight"):
        print("equal-weight test accuracy:", [round(a, 4) for a in base["equal_weight"]["test"]["accuracy"]])
        print("single-task test accuracy:", [round(s["test"]["accuracy"][0], 4) for s in base["single_task"]])
    if "hypervolume" in result:
        for k in ("errors", "losses"):
            h = result["hypervolume"][k]
            print(f"hypervolume of {k}: PaLoRA {h['palora']:.4f}, "
                  f"equal-weight {h.get('equal_weight', float('nan')):.4f}")
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
