# Builds palora_kernels._C with ninja through torch.utils.cpp_extension.
#
# Environment flags:
#   PALORA_SKIP_CUDA_BUILD=1   build the C++ (CPU) part only, even with a CUDA toolkit present
#   PALORA_CUDA_ARCHS="8.0;9.0" compute capabilities of the CUDA part (default "8.0;9.0")
#   CUDA_HOME=/usr/local/cuda  the toolkit (default: /usr/local/cuda when it exists)
#   MAX_JOBS=N                 parallel compile jobs for ninja (torch's cpp_extension reads it)
#   DEBUG=1                    -O0 -g host and device code
#
# The CUDA part is built when torch is a CUDA build (torch.version.cuda) and a toolkit is
# found; otherwise the build prints why and makes the C++ part alone. Install with
#   pip install --no-build-isolation -e .
# (without --no-build-isolation pip would fetch a second torch into the build environment).
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if home:
        os.environ["CUDA_HOME"] = home  # cpp_extension reads it at import
    return home


def _extensions():
    cuda_home = _cuda_home()
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cpp_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    why_not = None
    if os.environ.get("PALORA_SKIP_CUDA_BUILD", "0") == "1":
        why_not = "PALORA_SKIP_CUDA_BUILD=1"
    elif torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is not a CUDA build"
    elif not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        why_not = "no CUDA toolkit found (set CUDA_HOME)"
    elif not cuda_sources:
        why_not = "no CUDA sources under csrc/cuda"
    cxx = opt  # the C++ standard comes from cpp_extension (torch 2.14 headers need C++20)
    if why_not is not None:
        print(f"palora-kernels: building the C++ part only ({why_not})")
        ext = CppExtension("palora_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx})
    else:
        archs = os.environ.get("PALORA_CUDA_ARCHS", "8.0;9.0")
        gencode = []
        for a in archs.replace(",", ";").split(";"):
            a = a.strip().replace(".", "")
            if a:
                gencode += [f"-gencode=arch=compute_{a},code=sm_{a}"]
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v"] + gencode
        print(f"palora-kernels: building the C++ and CUDA parts for sm {archs} with {cuda_home}")
        ext = CUDAExtension("palora_kernels._C", cpp_sources + cuda_sources,
                            include_dirs=[os.path.join(HERE, "csrc")],
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="palora-kernels",
    version="0.1.0",
    description="Fused kernels for preference-conditioned low-rank adapters (PaLoRA, MTLoRA)",
    packages=find_packages(include=["palora_kernels", "palora_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
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
