// An nvcc translation unit: the conv forward and data gradient (csrc/cuda/lora_conv2d.cuh,
// conv_dgrad.cuh; they share the im2col shrink kernel) behind their plain entry points.
#include "cuda/conv_dgrad.cuh"
#include "cuda/lora_conv2d.cuh"

namespace palora {

const char* lora_conv2d_launch(const LoraConvArgs& args, void* stream) { return lora_conv2d_dispatch(args, stream); }

const char* lora_conv2d_dgrad_launch(const LoraConvDgradArgs& args, void* stream) {
  return lora_conv2d_dgrad_dispatch(args, stream);
}

}  // namespace palora
