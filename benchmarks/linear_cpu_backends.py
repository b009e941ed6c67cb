"""The linear layer on CPU, side by side: the plain layer against the fused layer on the ``torch`` backend
(all products MKL's) and on the ``cpp`` backend (the skinny products from palora::lowrank_shrink / lowrank_tmm),
timed interleaved round by round in one process (palora_kernels.bench.time_group), with ratios of medians.

    PYTHONPATH=$PWD python benchmarks/linear_cpu_backends.py [--pref sample] [--rounds 80] [--threads 2]

The numbers in docs/bench.md ("The cpp backend's linear path") come from this script.
"""
import argparse

import torch

from palora_kernels import bench, dispatch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pref", choices=bench.PREFS, default="sample")
    ap.add_argument("--mode", choices=bench.MODES, default="fwd+bwd")
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the small smoke-test shape")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = bench.get_case("linear", quick=args.quick)
    steps = {"base": bench.make_step(case, "base", args.mode, args.pref)}
    for name in ("torch", "cpp"):
        reason = dispatch.why_not(name, torch.device("cpu"), "lora_mm", torch.float32)
        if reason is not None:
            raise SystemExit(f"backend {name} cannot run here: {reason}")
        st = bench.make_step(case, "fused", args.mode, args.pref)

        def run(st=st, name=name):
            with dispatch.use_backend(name):
                st.run()
        steps[name] = bench.Step(run=run, forward=st.forward, tensors=st.tensors, backend=name)
    res = bench.time_group(steps, repeats=args.rounds)
    base = res["base"]["median_ms"]
    print(f"{case.describe()}, pref {args.pref}, {args.mode}, {args.threads} threads, {args.rounds} rounds")
    for name, r in res.items():
        print(f"{name:6s} median {r['median_ms']:7.1f} ms [{r['p25_ms']:.1f}-{r['p75_ms']:.1f}]  "
              f"ratio to base {r['median_ms'] / base:.3f}")


if __name__ == "__main__":
    main()
