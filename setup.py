# Builds palora_kernels._C with ninja through torch.utils.cpp_extension.
#
# Install (torch first, then this package WITHOUT build isolation, so the extension is built
# against the torch it will run with):
#   pip install --no-build-isolation -e .
#
# Environment flags:
#   PALORA_SKIP_CUDA_BUILD=1   build the C++ (CPU) part only, even with a CUDA toolkit present
#   PALORA_CUDA_ARCHS="8.0;9.0" compute capabilities of the CUDA part (default "8.0;9.0")
#   CUDA_HOME=/usr/local/cuda  the toolkit (default: /usr/local/cuda when it exists)
#   MAX_JOBS=N                 parallel compile jobs for ninja (torch's cpp_extension reads it)
#   DEBUG=1                    -O0 -g host and device code
#   PALORA_ALLOW_TORCH_MISMATCH=1  build even when the build's torch differs from the one the
#                              package will run with (for building wheels for another machine)
#
# The CUDA part is built when torch is a CUDA build (torch.version.cuda) and a toolkit is
# found; otherwise the C++ part alone. The build refuses to run when the torch it compiles
# against is not the torch of the environment it installs into (pip's default build isolation
# fetches its own torch): an extension built against another torch fails to load at import.
# pip hides a successful build's output unless -v, so the summary of what was built also goes
# to the terminal (/dev/tty) when there is one.
import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

FIX = "pip install --no-build-isolation -e ."
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def _say(msg):
    """stderr, and the terminal too: pip shows a successful build's output only with -v."""
    print(msg, file=sys.stderr, flush=True)
    if not BUILD_COMMANDS.intersection(sys.argv[1:]):
        return  # metadata steps (egg_info, dist_info) would repeat it
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(msg + "\n")
    except OSError:
        pass  # no terminal (CI): the message is in the build log


_RUNTIME_TORCH = r"""
import importlib.util, os, re
spec = importlib.util.find_spec("torch")
if spec is None or not spec.origin:
    print("none")
else:
    src = open(os.path.join(os.path.dirname(spec.origin), "version.py")).read()
    get = lambda k: (re.search(k + r"[^=\n]*=\s*'([^']*)'", src) or [None, None])[1]
    print(get("__version__"), get("cuda"), os.path.dirname(spec.origin))
"""


def _runtime_torch():
    """(version, cuda or None, path) of the torch the installed package will import, or None.

    pip's isolated build puts its own torch first on PYTHONPATH; ``python -E`` ignores that and
    sees the environment pip installs into. It reads torch/version.py without importing torch."""
    out = subprocess.run([sys.executable, "-E", "-c", _RUNTIME_TORCH], capture_output=True,
                         text=True, check=False).stdout.split()
    if not out or out[0] == "none":
        return None
    return out[0], (None if out[1] == "None" else out[1]), out[2]


def _check_torch_match():
    """Refuse to build against a torch other than the runtime's (version or CUDA-ness)."""
    import torch.version as tv  # torch/version.py only: cheap, and enough to compare

    build = (tv.__version__, tv.cuda, os.path.dirname(os.path.abspath(tv.__file__)))
    runtime = _runtime_torch()
    if runtime is not None and runtime[:2] == build[:2]:
        return
    if os.environ.get("PALORA_ALLOW_TORCH_MISMATCH", "0") == "1":
        _say(f"palora-kernels: WARNING: building against torch {build[0]} while the target "
             f"environment has {'no torch' if runtime is None else 'torch ' + runtime[0]} "
             "(PALORA_ALLOW_TORCH_MISMATCH=1); the extension may not load there.")
        return
    def desc(t):
        return f"torch {t[0]} ({'CUDA ' + t[1] if t[1] else 'CPU-only'}) at {t[2]}"
    have = "no torch" if runtime is None else desc(runtime)
    raise SystemExit(
        "\npalora-kernels: refusing to build. The extension would be compiled against\n"
        f"    {desc(build)}\n"
        f"but the environment it installs into has\n    {have}.\n"
        "An extension built against another torch fails to load at import (for example\n"
        "'libc10_cuda.so: cannot open shared object file'). pip's default build isolation\n"
        "fetches its own torch; build against yours instead:\n"
        + ("    pip install torch            # first, the build you want (CPU or CUDA)\n" if runtime is None else "")
        + f"    {FIX}\n"
        "(add the extras you need, e.g. \".[test]\"; for a non-editable install drop -e).\n"
        "To build anyway, e.g. a wheel for another machine: PALORA_ALLOW_TORCH_MISMATCH=1.\n")


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if home:
        os.environ["CUDA_HOME"] = home  # cpp_extension reads it at import
    return home


# The one translation unit of every source that includes torch headers (its #include "...cpp" lines):
# <torch/library.h> alone costs ~10 s of CPU per unit, once here instead of once per file (docs/cuda.md).
# distutils sorts the sources by path and ninja starts them in that order: the name sorts first, so the
# longest unit starts at once and the nvcc units share the other core.
TORCH_UNIT = "csrc/cpu/all_torch_ops.cpp"


def _sources():
    """(C++ sources, CUDA sources): TORCH_UNIT instead of the files it includes, then every other .cpp
    and .cu by glob (a new file is compiled on its own until it is added to TORCH_UNIT)."""
    with open(os.path.join(HERE, TORCH_UNIT), encoding="utf-8") as f:
        members = {os.path.normpath(os.path.join(os.path.dirname(TORCH_UNIT), m))
                   for m in re.findall(r'^#include "([^"]+\.cpp)"', f.read(), re.M)} | {TORCH_UNIT}
    rest = lambda pattern: [p for p in sorted(glob.glob(pattern)) if os.path.normpath(p) not in members]
    return ([TORCH_UNIT] + rest("csrc/cpu/*.cpp"), rest("csrc/cuda/*.cu") + rest("csrc/cuda/*.cpp"))


def _extensions():
    _check_torch_match()
    cuda_home = _cuda_home()
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cpp_sources, cuda_sources = _sources()
    why_not = None
    if os.environ.get("PALORA_SKIP_CUDA_BUILD", "0") == "1":
        why_not = "PALORA_SKIP_CUDA_BUILD=1"
    elif torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is not a CUDA build"
    elif not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        why_not = "no CUDA toolkit found (set CUDA_HOME)"
    elif not cuda_sources:
        why_not = "no CUDA sources under csrc/cuda"
    # the C++ standard comes from cpp_extension (torch 2.14 headers need C++20). -g0: Python's CFLAGS
    # carry -g, and debug info for the torch headers was ~30 % of the torch unit's CPU time (docs/cuda.md)
    cxx = opt + ([] if debug else ["-g0"])
    # at::parallel_for is an inline OpenMP loop in the torch headers: without -fopenmp the CPU ops run on one
    # thread (lowrank_shrink: 6.0 ms against 1.9 ms on 2 threads, 4096 x 1024 x 12). The runtime is the libgomp
    # torch already loaded (same soname).
    omp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx += omp
    if why_not is not None:
        _say(f"palora-kernels: building palora_kernels._C against torch {torch.__version__}: the C++ "
             f"(CPU) ops; NOT the CUDA kernels ({why_not}). The emulator backend cuda_sim is built "
             "on first use from csrc/ (source checkouts only).")
        ext = CppExtension("palora_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx}, extra_link_args=omp)
    else:
        archs = os.environ.get("PALORA_CUDA_ARCHS", "8.0;9.0")
        gencode = []
        for a in archs.replace(",", ";").split(";"):
            a = a.strip().replace(".", "")
            if a:
                gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v"] + gencode
        _say(f"palora-kernels: building palora_kernels._C against torch {torch.__version__}: the C++ "
             f"(CPU) ops and the CUDA kernels for sm {archs} with {cuda_home}/bin/nvcc "
             "(PALORA_SKIP_CUDA_BUILD=1 skips them). The emulator backend cuda_sim is built on "
             "first use from csrc/ (source checkouts only).")
        # TORCH_UNIT includes the CUDA bindings too (PALORA_WITH_CUDA)
        ext = CUDAExtension("palora_kernels._C", cpp_sources + cuda_sources,
                            include_dirs=[os.path.join(HERE, "csrc")],
                            extra_compile_args={"cxx": cxx + ["-DPALORA_WITH_CUDA"], "nvcc": nvcc},
                            extra_link_args=omp)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="palora-kernels",
    version="0.1.0",
    description="Fused kernels for preference-conditioned low-rank adapters (PaLoRA, MTLoRA)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: C++",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["palora_kernels", "palora_kernels.*"]),
    python_requires=">=3.10",  # torch 2.14 needs 3.10; the suite runs on 3.11
    install_requires=["torch>=2.4", "numpy"],
    extras_require={  # as documented in README.md "Install"
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ninja", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "examples": ["scikit-learn", "matplotlib", "tqdm", "moocore"],
    },
    entry_points={"console_scripts": ["palora-bench=palora_kernels.bench:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
