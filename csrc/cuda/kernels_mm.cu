// An nvcc translation unit: palora::lora_mm (csrc/cuda/lora_mm.cuh) behind its plain entry point
// (palora_cuda.h). The kernels are split over three .cu files so that a MAX_JOBS=2 build compiles
// them side by side (docs/cuda.md, Build). No torch header: each compiles in seconds.
#include "cuda/lora_mm.cuh"

namespace palora {

const char* lora_mm_launch(const LoraMMArgs& args, void* stream) { return lora_mm_dispatch(args, stream); }

}  // namespace palora
