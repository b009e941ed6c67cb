"""Merge train_multidigits.py runs of different seeds (same settings otherwise) into one result:
the seeds side by side, the summary over all of them, the acceptance checks and the front plot.
Each seed's training is a pure function of (settings, seed), so N single-seed runs (for example
run in parallel) give the same numbers as one ``--seeds N`` run.

    python python/merge_runs.py --out docs/multidigits runs/s0/multidigits.json runs/s1/multidigits.json ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_multidigits import _summary, add_acceptance, summarise  # noqa: E402

# settings that may differ between the merged runs
FREE = {"seed", "seeds", "out", "no_bench", "no_progress", "convergence", "bench_steps", "bench_rounds"}


def merge(paths: list) -> dict:
    runs = [json.load(open(p)) for p in paths]
    base = {k: v for k, v in runs[0]["config"].items() if k not in FREE}
    for p, r in zip(paths, runs):
        cfg = {k: v for k, v in r["config"].items() if k not in FREE}
        diff = {k: (base.get(k), v) for k, v in cfg.items() if base.get(k) != v and k in base}
        if {k for k in diff if k not in ("platform", "cpu", "cpu_count")}:
            raise ValueError(f"{p}: settings differ from {paths[0]}: {diff}")
        if r["data"] != runs[0]["data"]:
            raise ValueError(f"{p}: data digests differ from {paths[0]}")
    seeds = [s for r in runs for s in r["seeds"]]
    if len({s["seed"] for s in seeds}) != len(seeds):
        raise ValueError(f"seeds: expected distinct seeds, got {[s['seed'] for s in seeds]}")
    seeds.sort(key=lambda s: s["seed"])
    out = dict(runs[0])
    out["config"] = dict(runs[0]["config"], seed=seeds[0]["seed"], seeds=len(seeds))
    out["seeds"] = seeds
    out["merged_from"] = [{"path": p, "seeds": [s["seed"] for s in r["seeds"]], "timing_s": r["timing_s"]}
                          for p, r in zip(paths, runs)]
    out["timing_s"] = {"seeds": [s["seconds"] for s in seeds], "total": sum(s["seconds"] for s in seeds),
                       "note": "total = sum of the seeds' wall times (the runs were separate processes)"}
    for r in runs:
        if "throughput_memory" in r:
            out["throughput_memory"] = r["throughput_memory"]
    out["summary"] = summarise(seeds, out["config"]["tasks"])
    add_acceptance(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("runs", nargs="+", help="multidigits.json files")
    args = p.parse_args(argv)
    res = merge(args.runs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "multidigits.json"), "w") as f:
        json.dump(res, f, indent=1)
    if "baselines" in res["seeds"][0]:
        from multidigits.plot import plot_front
        plot_front(res, os.path.join(args.out, "multidigits_front.png"))
    _summary(res)


if __name__ == "__main__":
    main()
