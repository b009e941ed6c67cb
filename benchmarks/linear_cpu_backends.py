"""The linear layer on CPU, side by side: the plain layer against the fused layer on the ``torch`` backend
(all products MKL's) and on the ``cpp`` backend (the skinny products from palora::lowrank_shrink / lowrank_tmm),
timed interleaved round by round in one process (palora_kernels.bench.time_group), with ratios of medians.

    PYTHONPATH=$PWD python benchmarks/linear_cpu_backends.py [--pref sample] [--rounds 80] [--threads 2]
    PYTHONPATH=$PWD python benchmarks/linear_cpu_backends.py --ops [--rounds 40]

--ops times each C++ op of the cpp backend against the torch ops it replaces, on the benchmark's shape
(4096 x 1024, R = 12), interleaved round by round. The numbers in docs/bench.md (step 5) and docs/design.md
(CPU kernels) come from this script.
"""
import argparse
import statistics
import time

import torch

from palora_kernels import bench, dispatch


def op_pairs(N=4096, K=1024, R=12):
    """name -> (C++ op, the torch ops it replaces) on fresh outputs, as in the layer ("vs cpp one by one": the
    three products of lowrank_dual as three separate passes, the C++ ops where they exist)."""
    g = torch.Generator().manual_seed(0)
    x, m, h = torch.randn(N, K, generator=g), torch.randn(R, K, generator=g), torch.randn(N, R, generator=g)
    up, bias = torch.randn(R, K, generator=g), torch.randn(K, generator=g)
    h1 = torch.cat([h, h.new_ones(N, 1)], 1)
    ops = torch.ops.palora
    return {
        "shrink  x m^T": (lambda: ops.lowrank_shrink(x, m, 16), lambda: x @ m.t()),
        "tmm     g^T x": (lambda: ops.lowrank_tmm(h, x), lambda: h.t() @ x),
        "dual    x m^T, [g|1]^T x": (lambda: ops.lowrank_dual(x, m, h1, 16),
                                     lambda: (x @ m.t(), h.t() @ x, x.sum(0))),
        "dual    vs cpp one by one": (lambda: ops.lowrank_dual(x, m, h1, 16),
                                     lambda: (ops.lowrank_shrink(x, m, 16), ops.lowrank_tmm(h, x), x.sum(0))),
        "expand  bias + g up": (lambda: ops.lowrank_expand(h, up, bias),
                                lambda: torch.empty(N, K).copy_(bias.expand(N, K)).addmm_(h, up)),
    }


def time_ops(rounds: int) -> None:
    """Per op: 3 warm-up calls each, then ``rounds`` rounds of (cpp, torch): the allocator reaches its steady
    state for that op's buffers (interleaving all ops instead made each fresh 16 MiB output fault its pages in,
    ~6 ms, on both sides)."""
    for n, fns in op_pairs().items():
        samples = {"cpp": [], "torch": []}
        for _ in range(3):
            for fn in fns:
                fn()
        for _ in range(rounds):
            for w, fn in zip(("cpp", "torch"), fns):
                t0 = time.perf_counter()
                fn()
                samples[w].append((time.perf_counter() - t0) * 1e3)
        c, t = (statistics.median(samples[w]) for w in ("cpp", "torch"))
        print(f"{n:26s} cpp {c:6.2f} ms   torch {t:6.2f} ms   cpp/torch {c / t:.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pref", choices=bench.PREFS, default="sample")
    ap.add_argument("--mode", choices=bench.MODES, default="fwd+bwd")
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the small smoke-test shape")
    ap.add_argument("--ops", action="store_true", help="time the C++ ops one by one instead of the layer")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ops:
        from palora_kernels import _ext
        if not _ext._C_AVAILABLE:
            raise SystemExit(f"palora_kernels._C is not built: {_ext._C_ERROR}")
        print(f"4096 x 1024, R = 12, {args.threads} threads, {args.rounds} rounds, median")
        return time_ops(args.rounds)
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
