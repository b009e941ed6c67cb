// An nvcc translation unit: palora::mtlora_mm and palora::mtlora_mm_dgrad (csrc/cuda/mtlora_mm.cuh)
// behind their plain entry points (palora_cuda.h). Its own unit so that a MAX_JOBS=2 build compiles it
// beside the others; it instantiates only mtlora_gemm_kernel (3 dtypes x 2 B orientations), never a
// lora_gemm_kernel of another unit. No torch header.
#include "cuda/mtlora_mm.cuh"

namespace palora {

const char* mtlora_mm_launch(const MTLoraMMArgs& args, void* stream) { return mtlora_mm_dispatch(args, stream); }

const char* mtlora_mm_dgrad_launch(const MTLoraDgradArgs& args, void* stream) {
  return mtlora_mm_dgrad_dispatch(args, stream);
}

}  // namespace palora
