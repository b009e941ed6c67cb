"""The miniature MTLoRA experiment: one pre-trained Swin-like backbone fine-tuned on three
MultiDigits tasks by full fine-tuning, MTLoRA (matrix and matrixv2), one LoRA model per task and
decoders only, on the same splits and the same number of steps (docs/mtlora_experiment.md).

    PYTHONPATH=. python python/train_mtlora.py --out docs/mtlora_experiment        # the default run
    PYTHONPATH=. python python/train_mtlora.py --epochs 1 --out runs/mtlora

Tasks (hard layout, 12x12 canvas): ``seg``, the owner of every pixel (background / left digit /
right digit / both; mIoU), and ``left`` / ``right``, each digit's class (accuracy). The backbone
is first pre-trained on a different single task, the class of ONE digit on the canvas
(``multidigits.segmentation.single_digits``). Writes ``<out>/mtlora.json`` (per method: trainable
parameters, per-task metrics on val and test, Delta_m against the single-task models) and
``<out>/mtlora.png`` (trainable parameters against Delta_m, and the per-task metrics).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                       # python/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))      # repo root

from multidigits.data import LAYOUTS  # noqa: E402
from multidigits.segmentation import SEG_CLASSES, single_digits, with_masks  # noqa: E402
from multidigits.training import train  # noqa: E402
from mtlora_model import MiniSwin, MultiTaskNet, PretrainNet, freeze, to_mtlora, trainable_parameters  # noqa: E402

TASKS = {"seg": ("seg", len(SEG_CLASSES)), "left": ("cls", 10), "right": ("cls", 10)}
METRIC = {"seg": "miou", "left": "accuracy", "right": "accuracy"}      # the metric Delta_m uses per task
LOWER_IS_BETTER = set()                                                 # all three are higher-is-better
METHODS = ("full_ft", "mtlora_matrix", "mtlora_matrixv2", "single_task_lora", "decoders_only")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs over the training split, every method")
    p.add_argument("--pretrain-steps", type=int, default=600, help="steps of single-digit pre-training")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam, every method and the pre-training")
    p.add_argument("--dim", type=int, default=24, help="C: stage widths C, 2C, 4C")
    p.add_argument("--depths", type=int, nargs="+", default=[2, 2, 2])
    p.add_argument("--r-shared", type=int, default=8, help="rank of the shared (task-agnostic) adapters")
    p.add_argument("--r-task", type=int, default=2, help="rank of the task-specific adapters")
    p.add_argument("--scale", type=float, default=4.0, help="lora_shared_scale = lora_task_scale (reference: 4)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="LoRA dropout on the adapters' input, fused in the layer (reference: 0.05; the default run: 0)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--train-size", type=int, default=6000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--data", choices=tuple(LAYOUTS), default="hard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see docs/training.md)")
    p.add_argument("--out", default="runs/mtlora", help="directory for mtlora.json and mtlora.png")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "dim", "r_shared", "r_task", "train_size", "val_size", "test_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.pretrain_steps < 0:
        p.error(f"--pretrain-steps: expected >= 0, got {args.pretrain_steps}")
    if len(args.depths) != 3 or min(args.depths) < 1:
        p.error(f"--depths: expected 3 values >= 1 (the 16x16 input allows 3 stages), got {args.depths}")
    if args.dim % 2:
        p.error(f"--dim: expected an even number (2 heads in stage 1), got {args.dim}")
    if args.batch_size > args.train_size:
        p.error(f"--batch-size: expected <= --train-size {args.train_size}, got {args.batch_size}")
    return args


# -- data ------------------------------------------------------------------------------------------
def load(split, size, layout):
    """images (N, 1, 12, 12), labels (N, 2 + 144): left class, right class, then the flattened pixel labels
    (one tensor, so the project's train loop can index it by batch)."""
    md, masks = with_masks(split, size, seed=0, layout=layout)
    return md.images, torch.cat([md.labels, masks.flatten(1)], 1)


def split_labels(y, side):
    return {"left": y[:, 0], "right": y[:, 1], "seg": y[:, 2:].view(-1, side, side)}


def task_loss(tasks, side):
    """Sum of the tasks' cross-entropies (equal weights); the per-task values for the history."""
    def loss_fn(model, x, y, step):
        out, lab = model(x), split_labels(y, side)
        losses = torch.stack([F.cross_entropy(out[t], lab[t]) for t in tasks])
        return losses.sum(), losses.detach()[None]
    return loss_fn


@torch.no_grad()
def evaluate(model, images, labels, tasks, side, batch_size=500) -> dict:
    """Per task: seg -> mIoU over the 4 classes (confusion matrix over the whole split, as in
    semantic-segmentation benchmarks) and pixel accuracy; cls -> accuracy."""
    model.eval()
    conf = torch.zeros(len(SEG_CLASSES), len(SEG_CLASSES), dtype=torch.int64)
    correct = {t: 0 for t in tasks}
    for i in range(0, len(images), batch_size):
        out, lab = model(images[i:i + batch_size]), split_labels(labels[i:i + batch_size], side)
        for t in tasks:
            pred = out[t].argmax(1)
            correct[t] += int((pred == lab[t]).sum())
            if TASKS[t][0] == "seg":
                k = len(SEG_CLASSES)
                conf += torch.bincount((lab[t] * k + pred).flatten(), minlength=k * k).view(k, k)
    model.train()
    res = {}
    for t in tasks:
        if TASKS[t][0] == "seg":
            tp = conf.diag().double()
            iou = tp / (conf.sum(0) + conf.sum(1) - conf.diag()).double().clamp(min=1)
            res[t] = {"miou": float(iou.mean()), "iou": dict(zip(SEG_CLASSES, iou.tolist())),
                      "pixel_accuracy": float(tp.sum() / conf.sum())}
        else:
            res[t] = {"accuracy": correct[t] / len(images)}
    return res


def delta_m(metrics: dict, reference: dict) -> float:
    """Delta_m (Maninis et al. 2019; the MTLoRA paper's Table 1): mean over tasks of the relative
    change of each task's metric against the reference, in %, sign-flipped for lower-is-better."""
    terms = []
    for t, m in METRIC.items():
        a, b = metrics[t][m], reference[t][m]
        terms.append((-1 if t in LOWER_IS_BETTER else 1) * (a - b) / b)
    return 100.0 * sum(terms) / len(terms)


# -- methods ---------------------------------------------------------------------------------------
def param_counts(model) -> dict:
    """Trainable parameters, split into adapters, decoders and the rest (norms, patch embedding, ...)."""
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    lora = sum(k for n, k in trainable if "lora_" in n)
    dec = sum(k for n, k in trainable if n.startswith("decoders."))
    return {"trainable": sum(k for _, k in trainable), "adapters": lora, "decoders": dec,
            "other": sum(k for _, k in trainable) - lora - dec,
            "total": sum(p.numel() for p in model.parameters())}


def build(method, pretrained, decoders, args, task=None):
    """The network of ``method`` (for single_task_lora: the one for ``task``), from the pretrained
    backbone and the shared decoder initialisation."""
    bb = copy.deepcopy(pretrained)
    tasks = {task: TASKS[task]} if task else TASKS
    net = MultiTaskNet(bb, tasks)
    net.decoders.load_state_dict({k: v for k, v in decoders.state_dict().items() if k.split(".")[0] in tasks})
    torch.manual_seed(args.seed + 17)                 # the same adapter initialisation for every method
    if method == "decoders_only":
        freeze(bb)
    elif method.startswith("mtlora"):
        to_mtlora(bb, list(TASKS), args.r_shared, args.r_task, args.scale, args.lora_dropout,
                  shared_mode=method.split("_", 1)[1])
    elif method == "single_task_lora":
        to_mtlora(bb, None, args.r_shared, args.r_task, args.scale, args.lora_dropout)
    return net


def run_method(method, pretrained, decoders, data, args, side, progress):
    steps = args.epochs * (len(data["train"][0]) // args.batch_size)
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=progress)
    t0 = time.perf_counter()
    if method == "single_task_lora":
        parts, metrics = [], {"val": {}, "test": {}}
        for t in TASKS:
            net = build(method, pretrained, decoders, args, task=t)
            train(net, *data["train"], task_loss([t], side), desc=f"{method} {t}", **common)
            parts.append(param_counts(net))
            for s in ("val", "test"):
                metrics[s].update(evaluate(net, *data[s], [t], side))
        counts = {k: sum(p[k] for p in parts) for k in parts[0]}
        counts["per_task"] = dict(zip(TASKS, parts))
    else:
        net = build(method, pretrained, decoders, args)
        train(net, *data["train"], task_loss(list(TASKS), side), desc=method, **common)
        counts = param_counts(net)
        metrics = {s: evaluate(net, *data[s], list(TASKS), side) for s in ("val", "test")}
    return {"params": counts, "steps": steps, "seconds": time.perf_counter() - t0, **metrics}


def pretrain(args, side, progress):
    torch.manual_seed(args.seed)
    bb = MiniSwin(dim=args.dim, depths=tuple(args.depths), heads=(2, 4, 8), side=side)
    net = PretrainNet(bb)
    x, y = single_digits("train", max(args.train_size, args.batch_size), seed=args.seed, layout=args.data)
    t0 = time.perf_counter()
    if args.pretrain_steps:
        train(net, x, y[:, None], lambda m, xb, yb, s: _ce(m, xb, yb), epochs=1, max_steps=args.pretrain_steps,
              batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=progress, desc="pre-train (1 digit)")
    xt, yt = single_digits("test", args.test_size, seed=args.seed, layout=args.data)
    with torch.no_grad():
        net.eval()
        acc = float((net(xt)[0].argmax(1) == yt).double().mean())
    return bb, {"task": "class of one digit on the canvas (train-split source digits)", "steps": args.pretrain_steps,
                "seconds": time.perf_counter() - t0, "test_accuracy": acc}


def _ce(model, x, y):
    loss = F.cross_entropy(model(x)[0], y[:, 0])
    return loss, loss.detach()[None, None]


def main(argv=None) -> dict:
    t_start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    side = LAYOUTS[args.data][0]
    data = {s: load(s, getattr(args, f"{s}_size"), args.data) for s in ("train", "val", "test")}
    print(f"MultiDigits ({args.data}) with pixel labels: train {args.train_size}, val {args.val_size}, "
          f"test {args.test_size}; tasks {list(TASKS)}; methods {args.methods}", flush=True)
    pretrained, pre = pretrain(args, side, progress)
    torch.manual_seed(args.seed + 1)
    decoders = MultiTaskNet(pretrained, TASKS).decoders        # one initialisation, copied into every method
    result = {"config": {**vars(args), "tasks": {t: {"kind": k, "classes": c, "metric": METRIC[t]}
                                                 for t, (k, c) in TASKS.items()},
                         "seg_classes": list(SEG_CLASSES), "torch": torch.__version__,
                         "python": platform.python_version(), "cpu_count": os.cpu_count()},
              "pretrain": pre, "methods": {}}
    for m in args.methods:
        result["methods"][m] = run_method(m, pretrained, decoders, data, args, side, progress)
    summarise(result)
    result["seconds"] = time.perf_counter() - t_start
    # a shared machine stretches the wall time; the CPU time and the load average say by how much
    result["cpu_seconds"] = time.process_time() - cpu_start
    result["load_average_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mtlora.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "mtlora.png"))
    print_table(result)
    return result


def summarise(result):
    """Delta_m of every method against the single-task models (when they ran), and the parameter ratios."""
    ms = result["methods"]
    ref = ms.get("single_task_lora")
    for m, r in ms.items():
        r["delta_m"] = {s: delta_m(r[s], ref[s]) for s in ("val", "test")} if ref else None
    if "full_ft" in ms:
        result["full_ft_params_over"] = {m: ms["full_ft"]["params"]["trainable"] / r["params"]["trainable"]
                                         for m, r in ms.items()}


def table_rows(result):
    rows = []
    for m, r in result["methods"].items():
        t = r["test"]
        dm = r["delta_m"]["test"] if r["delta_m"] else None
        rows.append((m, r["params"]["trainable"], 100 * t["seg"]["miou"], 100 * t["left"]["accuracy"],
                     100 * t["right"]["accuracy"], dm))
    return rows


def print_table(result):
    print("| method | trainable params | seg mIoU | left acc. | right acc. | Delta_m vs single-task (%) |")
    print("|---|---|---|---|---|---|")
    for m, n, s, a, b, dm in table_rows(result):
        print(f"| {m} | {n:,} | {s:.1f} | {a:.1f} | {b:.1f} | {'-' if dm is None else f'{dm:+.2f}'} |")
    print(f"pre-training test accuracy {100 * result['pretrain']['test_accuracy']:.1f}%; total {result['seconds']:.0f} s")


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = table_rows(result)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    has_dm = all(r[-1] is not None for r in rows)        # Delta_m needs the single-task models
    pts = [(m, n, dm if has_dm else (s + a + b) / 3) for m, n, s, a, b, dm in rows]
    for m, n, y in pts:
        ax.scatter(n, y, s=40)
        # the two MTLoRA modes share a parameter count: the higher point's label goes above, the other's below
        below = any(n2 == n and y2 > y for _, n2, y2 in pts)
        ax.annotate(f"{m} ({y:+.1f})" if has_dm else m, (n, y), textcoords="offset points",
                    xytext=(6, -11 if below else 5), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.12)
    from matplotlib.ticker import FuncFormatter, NullFormatter
    lo, hi = min(p[1] for p in pts) / 1.5, max(p[1] for p in pts) * 1.5
    ax.set_xticks([v for k in range(2, 9) for v in (10 ** k, 2 * 10 ** k, 5 * 10 ** k) if lo <= v <= hi])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if has_dm:
        ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("Delta_m vs single-task LoRA (%, test)" if has_dm else "mean of the task metrics (%, test)")
    ax.set_title("trainable parameters vs Delta_m" if has_dm else "trainable parameters vs mean metric")
    width = 0.8 / len(rows)
    for i, (m, _, s, a, b, _) in enumerate(rows):
        bx.bar([k + i * width for k in range(3)], [s, a, b], width, label=m)
    bx.set_xticks([k + 0.4 - width / 2 for k in range(3)], ["seg mIoU", "left acc.", "right acc."])
    lo = min(min(r[2:5]) for r in rows)
    bx.set_ylim(max(0, lo - 10), 100)
    bx.set_ylabel("% (test)")
    bx.legend(fontsize=7, loc="upper center", ncol=3)
    bx.set_title("per-task metrics")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
