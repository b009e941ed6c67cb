"""The LoRA-dropout variants of the Triton kernels (docs/dropout.md) compiled ahead of time for sm_80 and
sm_90 (no GPU) with kernel_report's launch arguments, shape and configs: registers, spills, shared memory.

    python -m palora_kernels.tools.kernel_report_dropout [bf16,fp32,tf32,fp64]

kernel_report's tables do not include these variants (its signature builder types every scalar
argument from an int); this prints the same facts, one line per kernel x config x arch, for the
forward (DROP_IN: in-loop, and the split path's shrink kernel) and dX (DROP_OUT) launches.
"""
import contextlib
import io
import re
import sys
import tempfile

ARCHS = {"sm_80": 80, "sm_90": 90}


def _jobs(dt):
    import triton.language as tl

    from ..backends.triton import linear as L
    from . import kernel_report as KR
    mma = L.mma_class("fp32" if dt == "tf32" else dt, "tf32" if dt == "tf32" else "ieee")
    common = dict(UPCAST=False, ACC_DTYPE=tl.float64 if dt == "fp64" else tl.float32,
                  INPUT_PRECISION="tf32" if dt == "tf32" else "ieee", BLOCK_R=L.block_r(24), _dtype=dt)
    for (sname, pref), (mm, shrink, _) in KR._launch_sets(dt).items():
        if pref != "sample" or sname == "fwd no-bias":
            continue
        for path in ("inloop", "split"):
            if sname == "fwd" and path == "split":      # the split forward's GEMM draws no mask
                continue
            c = dict(common, HAS_BIAS=sname == "fwd", PER_SAMPLE_PREF=True, SHRINK_IN_LOOP=path == "inloop",
                     EXPAND=True, DROP_IN=sname == "fwd", DROP_OUT=sname == "dX")
            yield f"lora_mm[{path}, {sname}, dropout] {dt}", L._lora_mm_kernel.fn, c, mm, L.configs_for, mma
        if sname == "fwd":
            yield (f"lora_shrink[fwd, dropout] {dt}", L._lora_shrink_kernel.fn, dict(common, DROP_IN=True), shrink,
                   L.skinny_configs_for, mma)


def main(dts):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import kernel_report as KR
    bad = 0
    with tempfile.TemporaryDirectory() as cache:
        triton.knobs.cache.dir = cache                   # a fresh cache: ptxas runs and logs
        triton.knobs.nvidia.dump_ptxas_log = True
        for dt in dts:
            for name, fn, const0, args, configs_for, mma in _jobs(dt):
                for arch in ARCHS:
                    for cfg in configs_for(arch, mma):
                        kwargs, warps, stages = KR._cfg_parts(cfg)
                        const = dict(const0, **kwargs)
                        d = const.pop("_dtype")
                        sig, attrs, ones = KR._signature(fn, const, args, d)
                        const.update({k: v for k, v in ones.items() if not k.startswith("drop_")})
                        sig.update(drop_p="fp32", drop_seed="i64", drop_offset="i64", drop_sr="i64", drop_sc="i64",
                                   dscale_ptr="*fp64" if dt == "fp64" else "*fp32")
                        log = io.StringIO()
                        label = f"{name:36s} {arch} {kwargs} w{warps} s{stages}"
                        try:
                            with contextlib.redirect_stdout(log):
                                k = triton.compile(ASTSource(fn, sig, const, attrs),
                                                   target=GPUTarget("cuda", ARCHS[arch], 32),
                                                   options={"num_warps": warps, "num_stages": stages})
                        except Exception as exc:
                            bad += 1
                            print(f"{label}: ERROR {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                            continue
                        text = log.getvalue()
                        regs = re.search(r"Used (\d+) registers", text)
                        spills = sum(int(a) + int(b) for a, b in
                                     re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text))
                        bad += spills > 0
                        print(f"{label}: registers {regs.group(1) if regs else '?'}, spills {spills}, "
                              f"smem {k.metadata.shared}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["bf16", "fp32", "tf32", "fp64"]))
