"""The Pareto-front figure (matplotlib, Agg): PaLoRA's ray sweep against the baselines."""
from __future__ import annotations

import itertools

TASK_NAMES = ("left digit", "right digit", "parity of sum")


def plot_front(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = result["config"]["tasks"]
    rays = result["palora"]["rays"]
    ew = result["baselines"]["equal_weight"]["test"]
    stl = [s["test"] for s in result["baselines"]["single_task"]] if result["baselines"]["single_task"] else []
    hv = result["hypervolume"]
    if T == 2:
        panels = [("accuracy", (0, 1)), ("loss", (0, 1))]
    else:
        panels = [("accuracy", p) for p in itertools.combinations(range(T), 2)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    weight0 = [r["ray"][0] for r in rays]
    for ax, (metric, (a, b)) in zip(axes[0], panels):
        xs = [r["test"][metric][a] for r in rays]
        ys = [r["test"][metric][b] for r in rays]
        if T == 2:
            ax.plot(xs, ys, "-", color="0.6", lw=1, zorder=1)
        sc = ax.scatter(xs, ys, c=weight0, cmap="viridis", vmin=0, vmax=1, s=42, zorder=3,
                        edgecolors="k", linewidths=0.4, label="PaLoRA, one net, swept rays")
        ax.scatter([ew[metric][a]], [ew[metric][b]], marker="*", s=260, color="tab:red", edgecolors="k",
                   linewidths=0.6, zorder=4, label="equal-weight multi-task net")
        if stl:
            ax.axvline(stl[a][metric][0], color="tab:orange", ls="--", lw=1.2,
                       label="single-task nets (one per task)")
            ax.axhline(stl[b][metric][0], color="tab:orange", ls="--", lw=1.2)
        ax.set_xlabel(f"test {metric}, task {a + 1}: {TASK_NAMES[a]}")
        ax.set_ylabel(f"test {metric}, task {b + 1}: {TASK_NAMES[b]}")
        ax.grid(alpha=0.3)
        better = "up and right is better" if metric == "accuracy" else "down and left is better"
        ax.set_title(f"{metric} ({better})", fontsize=10)
        ax.legend(fontsize=7.5, loc="best", framealpha=0.85)
    cbar = fig.colorbar(sc, ax=axes[0].tolist(), fraction=0.025, pad=0.02)
    cbar.set_label("ray weight of task 1")
    he, hl = hv["errors"], hv["losses"]
    fig.suptitle(f"MultiDigits, {T} tasks, test split: hypervolume of errors (ref {he['ref'][0]:g}) "
                 f"PaLoRA {he['palora']:.4f} vs equal-weight {he['equal_weight']:.4f}; "
                 f"of losses (ref ln C) {hl['palora']:.3f} vs {hl['equal_weight']:.3f}", fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
