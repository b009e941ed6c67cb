// The one translation unit that parses the torch headers: the CPU ops and, in a CUDA build
// (PALORA_WITH_CUDA, defined by setup.py), the CUDA bindings. <torch/library.h> alone costs ~10 s of
// CPU to compile, and each of the three files paid it (docs/cuda.md, Build). setup.py compiles the
// files included here through this unit only; the other .cpp files of csrc/cpu and csrc/cuda, and
// every .cu, are units of their own. This path sorts first, so ninja starts this, the longest unit,
// first. The included files keep their helpers in anonymous namespaces under distinct names.
#include "lowrank_ops.cpp"
#include "pref_ops.cpp"
#include "rng_ops.cpp"
#ifdef PALORA_WITH_CUDA
#include "../cuda/bindings.cpp"
#endif
