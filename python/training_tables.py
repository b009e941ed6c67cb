"""Markdown tables for docs/training.md from the JSON that train_multidigits.py writes.

    python python/training_tables.py docs/multidigits/multidigits.json
    python python/training_tables.py --explore LABEL=run1/multidigits.json LABEL2=run2/multidigits.json

``--explore``: one row per run and split (val, then test) of the PaLoRA front only (works on
``--no-baselines`` runs): monotonicity of the mean front and of each seed's front, the end steps,
the corner rays' accuracy and the front hypervolume, all recomputed from the per-seed ray metrics.
"""
from __future__ import annotations

import json
import statistics
import sys


sys.path.insert(0, __file__.rsplit("/", 1)[0])


def _ms(xs, scale=100.0, nd=1):
    xs = [x * scale for x in xs]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.{nd}f} ± {sd:.{nd}f}"


def tables(path: str) -> str:
    r = json.load(open(path))
    seeds = r["seeds"]
    T = r["config"]["tasks"]
    out = []
    n = len(seeds)
    c = r["config"]
    out.append(f"Preset `{c['preset']}`, data `{c['data']}`, {n} seed(s) ({c['seed']}..{c['seed'] + n - 1}), "
               f"{seeds[0]['palora']['train']['steps']} PaLoRA steps of {c['batch_size']} images x "
               f"{seeds[0]['palora']['train']['rays_per_step']} rays; total {r['timing_s']['total'] / 60:.1f} min.\n")
    # front table: test accuracy (%) mean ± sd at each ray
    rays = [x["ray"] for x in seeds[0]["palora"]["rays"]]
    has_b = "baselines" in seeds[0]
    hdr = "| ray (w_left, w_right) | PaLoRA left | PaLoRA right |" + (" PaMaL left | PaMaL right | LS net left | LS net right |" if has_b else "")
    out.append(hdr)
    out.append("|" + "---|" * (hdr.count("|") - 1))
    for i, ray in enumerate(rays):
        row = f"| ({ray[0]:.1f}, {ray[1]:.1f}) |" if T == 2 else f"| {tuple(round(v, 2) for v in ray)} |"
        for t in range(min(T, 2)):
            row += f" {_ms([s['palora']['rays'][i]['test']['accuracy'][t] for s in seeds])} |"
        if has_b:
            for t in range(min(T, 2)):
                row += f" {_ms([s['baselines']['pamal']['rays'][i]['test']['accuracy'][t] for s in seeds])} |"
            ls = seeds[0]["baselines"]["ls_front"]["nets"]
            j = next((k for k, e in enumerate(ls) if all(abs(a - b) < 1e-6 for a, b in zip(e["ray"], ray))), None)
            for t in range(min(T, 2)):
                row += (f" {_ms([s['baselines']['ls_front']['nets'][j]['test']['accuracy'][t] for s in seeds])} |"
                        if j is not None else " |")
        out.append(row)
    if has_b:
        ew = " | ".join(_ms([s["baselines"]["equal_weight"]["test"]["accuracy"][t] for s in seeds]) for t in range(T))
        st = " | ".join(_ms([s["baselines"]["single_task"][t]["test"]["accuracy"][0] for s in seeds]) for t in range(T))
        b0 = seeds[0]["baselines"]
        out.append("")
        out.append(f"Equal-weight net ({b0['equal_weight']['steps']} steps): test accuracy {ew}. "
                   f"Single-task nets ({b0['single_task'][0]['steps']} steps each): {st}. "
                   f"Linear-scalarisation nets: {b0['ls_front']['steps_per_net']} steps each; PaMaL: "
                   f"{b0['pamal']['steps']} steps of {seeds[0]['palora']['train']['rays_per_step']} rays.\n")
        summ = r["summary"]
        out.append("| hypervolume (test), mean ± sd x 100 | errors, ref 1 | losses, ref 1 |")
        out.append("|---|---|---|")
        names = {"palora": "PaLoRA", "pamal": "PaMaL ensemble", "ls_front": "linear-scalarisation nets"}
        for m in ("palora", "pamal", "ls_front"):
            for part, label in (("front", "front (all rays / nets)"), ("best_single", "best single ray / net")):
                h = summ["hypervolume"][m][part]
                out.append(f"| {names[m]}, {label} | {_ms(h['errors']['values'])} | {_ms(h['losses']['values'])} |")
        for m, label in (("equal_weight", "equal-weight net (one point)"),
                         ("single_task_ideal_point", "single-task nets' ideal point (T nets)")):
            h = summ["hypervolume"][m]
            out.append(f"| {label} | {_ms(h['errors']['values'])} | {_ms(h['losses']['values'])} |")
        d = summ["front_vs_ls_front_errors"]
        out.append("")
        out.append(f"Front HV of errors, PaLoRA minus linear-scalarisation front, paired by seed: "
                   f"{_ms(d['values'], nd=2)} (x 100).\n")
        out.append("| corner | PaLoRA at its corner ray | single-task net | paired diff (PaLoRA - single) | paired t | PaMaL at the corner |")
        out.append("|---|---|---|---|---|---|")
        for cc in summ["corners"]:
            t = cc["task"]
            tt = f"{cc['paired_t']:.2f}" if cc["paired_t"] is not None else "-"
            out.append(f"| task {t + 1} | {_ms(cc['palora']['values'])} | {_ms(cc['single_task']['values'])} | "
                       f"{_ms(cc['paired_diff_palora_minus_single']['values'])} | {tt} | {_ms(cc['pamal']['values'])} |")
        if "monotone" in summ:
            mo = summ["monotone"]
            out.append("")
            out.append(f"Monotone (mean front, test): {mo['violations']} violations of {mo['checked_pairs']} "
                       f"neighbour checks, largest {mo['max_violation'] * 100:.2f} points.")
        if "acceptance" in r:
            out.append("")
            out.append("acceptance: `" + json.dumps(r["acceptance"]) + "`")
    if "throughput_memory" in r:
        out.append("")
        out.append("| layers / ray passes | images/s | saved for backward | step peak |")
        out.append("|---|---|---|---|")
        for name, cfg in r["throughput_memory"]["configs"].items():
            mem = cfg.get("cuda_peak_step_bytes", cfg.get("cpu_peak_rss_growth_bytes", 0)) / 2**20
            out.append(f"| {name} | {cfg['images_per_s']:,.0f} | {cfg['saved_for_backward_bytes'] / 2**20:.1f} MiB | "
                       f"{mem:.1f} MiB |")
    out.append("")
    out.append(f"Timing: {json.dumps({k: v for k, v in r['timing_s'].items()})}; cpu: {c.get('cpu')}")
    return "\n".join(out)


def front_stats(r: dict, split: str) -> dict:
    """PaLoRA front of a 2-task run on ``split``, from the per-seed ray metrics (mean over seeds)."""
    from multidigits.pareto import hypervolume
    seeds = r["seeds"]
    n = len(seeds[0]["palora"]["rays"])
    acc = [[[s["palora"]["rays"][i][split]["accuracy"][t] for i in range(n)] for t in range(2)] for s in seeds]
    mean = [[statistics.fmean(a[t][i] for a in acc) for t in range(2)] for i in range(n)]

    def steps(front):        # > 0: the right direction (task 1's weight rises along the rays)
        return ([front[i][0] - front[i - 1][0] for i in range(1, n)], [front[i - 1][1] - front[i][1] for i in range(1, n)])
    s1, s2 = steps(mean)
    bad = [-d for d in s1 + s2 if d < 0]
    per_seed = sum(d < 0 for a in acc for d in sum(steps([[a[0][i], a[1][i]] for i in range(n)]), []))
    hv = [hypervolume([[1 - a[0][i], 1 - a[1][i]] for i in range(n)], [1.0, 1.0])[0] for a in acc]
    return {"violations": len(bad), "largest": max(bad, default=0.0), "per_seed": per_seed,
            "end_steps": (s1[-1], s2[0]), "corners": ([a[0][-1] for a in acc], [a[1][0] for a in acc]), "hv": hv}


def explore(labelled: list) -> str:
    out = ["| run | split | mean-front violations (largest, points) | per-seed violations (of 60) | end steps left / right "
           "(points) | left at (1, 0) | right at (0, 1) | front HV x 100 |",
           "|---|---|---|---|---|---|---|---|"]
    for label, path in labelled:
        r = json.load(open(path))
        for split in ("val", "test"):
            f = front_stats(r, split)
            out.append(f"| {label} | {split} | {f['violations']} ({f['largest'] * 100:.2f}) | {f['per_seed']} | "
                       f"{f['end_steps'][0] * 100:+.2f} / {f['end_steps'][1] * 100:+.2f} | {_ms(f['corners'][0])} | "
                       f"{_ms(f['corners'][1])} | {_ms(f['hv'])} |")
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--explore"]:
        print(explore([a.split("=", 1) if "=" in a else (a, a) for a in sys.argv[2:]]))
        sys.exit()
    for p in sys.argv[1:]:
        print(tables(p))
        print()
