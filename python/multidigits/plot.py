"""Figures (matplotlib, Agg): the Pareto fronts against the baselines, and hypervolume per epoch."""
from __future__ import annotations

import itertools
import statistics

TASK_NAMES = ("left digit", "right digit", "parity of sum")


def _mean_points(entries_per_seed, metric, t, split="test"):
    """Mean over seeds of entry i's metric for task t, for every i."""
    n = len(entries_per_seed[0])
    return [statistics.fmean(es[i][split][metric][t] for es in entries_per_seed) for i in range(n)]


def _ticks(ax):
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))      # fewer ticks: labels never overlap
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6))


def plot_front(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = result["config"]["tasks"]
    seeds = result["seeds"]
    pal = [s["palora"]["rays"] for s in seeds]
    pam = [s["baselines"]["pamal"]["rays"] for s in seeds]
    ls = [s["baselines"]["ls_front"]["nets"] for s in seeds]
    ew = [[s["baselines"]["equal_weight"]] for s in seeds]
    st = [[{"test": {"accuracy": [s["baselines"]["single_task"][t]["test"]["accuracy"][0] for t in range(T)],
                     "loss": [s["baselines"]["single_task"][t]["test"]["loss"][0] for t in range(T)]}}] for s in seeds]
    summ = result["summary"]["hypervolume"]
    panels = [("accuracy", (0, 1)), ("loss", (0, 1))] if T == 2 else \
        [("accuracy", p) for p in itertools.combinations(range(T), 2)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 5.0), squeeze=False)
    weight0 = [r["ray"][0] for r in pal[0]]
    for ax, (metric, (a, b)) in zip(axes[0], panels):
        for k, seed_rays in enumerate(pal):           # each seed's front, faint
            ax.plot([r["test"][metric][a] for r in seed_rays], [r["test"][metric][b] for r in seed_rays],
                    "-", color="tab:blue", alpha=0.2, lw=0.8, zorder=1)
        xs, ys = _mean_points(pal, metric, a), _mean_points(pal, metric, b)
        if T == 2:
            ax.plot(xs, ys, "-", color="tab:blue", lw=1.2, zorder=2)
        sc = ax.scatter(xs, ys, c=weight0, cmap="viridis", vmin=0, vmax=1, s=42, zorder=4, edgecolors="k",
                        linewidths=0.4, label="PaLoRA, one net, swept rays (mean)")
        px, py = _mean_points(pam, metric, a), _mean_points(pam, metric, b)
        ax.plot(px, py, "s--" if T == 2 else "s", color="tab:purple", ms=4, lw=1, alpha=0.8, zorder=3,
                label="PaMaL ensemble, swept rays (mean)")
        lx, ly = _mean_points(ls, metric, a), _mean_points(ls, metric, b)
        ax.scatter(lx, ly, marker="x", color="tab:green", s=40, zorder=3, label="linear-scalarisation nets (mean)")
        ax.scatter(_mean_points(ew, metric, a), _mean_points(ew, metric, b), marker="*", s=260, color="tab:red",
                   edgecolors="k", linewidths=0.6, zorder=5, label="equal-weight net (mean)")
        ax.axvline(_mean_points(st, metric, a)[0], color="tab:orange", ls="--", lw=1.2,
                   label="single-task nets (mean)")
        ax.axhline(_mean_points(st, metric, b)[0], color="tab:orange", ls="--", lw=1.2)
        if metric == "accuracy":                  # keep the view on the fronts, not the LS corner nets' untrained heads
            lo_x = min(xs + px) - 0.03
            lo_y = min(ys + py) - 0.03
            ax.set_xlim(left=lo_x)
            ax.set_ylim(bottom=lo_y)
        else:
            ax.set_xlim(right=max(xs + px) + 0.15)
            ax.set_ylim(top=max(ys + py) + 0.15)
        _ticks(ax)
        ax.set_xlabel(f"test {metric}, task {a + 1}: {TASK_NAMES[a]}")
        ax.set_ylabel(f"test {metric}, task {b + 1}: {TASK_NAMES[b]}")
        ax.grid(alpha=0.3)
        better = "up and right is better" if metric == "accuracy" else "down and left is better"
        ax.set_title(f"{metric} ({better})", fontsize=10)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    cbar = fig.colorbar(sc, ax=axes[0].tolist(), fraction=0.025, pad=0.02)
    cbar.set_label("ray weight of task 1")
    hp, hl = summ["palora"]["front"]["errors"], summ["ls_front"]["front"]["errors"]
    fig.suptitle(f"MultiDigits ({result['config']['data']}), {T} tasks, preset {result['config']['preset']}, "
                 f"test, {len(seeds)} seed(s): front hypervolume of errors (ref 1) PaLoRA {hp['mean']:.4f} "
                 f"+- {hp['sd']:.4f} vs linear-scalarisation front {hl['mean']:.4f} +- {hl['sd']:.4f}", fontsize=9.5)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


SAMPLER_NAMES = {"annealed": "deterministic annealed schedule", "dirichlet": "annealed Dirichlet rays",
                 "random": "random rays"}


def convergence_title(result: dict) -> str:
    """The convergence figure's title, naming the samplers that were actually compared."""
    c = result["config"]
    compared = " vs ".join(SAMPLER_NAMES.get(name, name) for name in result["convergence"])
    return (f"PaLoRA on MultiDigits ({c['data']}), preset {c['preset']}, seed {c['seed']}, "
            f"{c['rays']} ray(s) per step: {compared}")


def plot_convergence(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, split in zip(axes, ("val", "test")):
        for (name, curve), style in zip(result["convergence"].items(), ("o-", "s--", "^:")):
            ax.plot([c["epoch"] for c in curve], [c[split]["errors"] for c in curve], style, ms=4,
                    label=f"sampler {name}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{split} hypervolume of errors (ref 1), 11 rays")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _ticks(ax)
    fig.suptitle(convergence_title(result), fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
