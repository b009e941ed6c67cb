// The nvcc translation unit: the kernels of csrc/cuda/*.cuh for this build's archs, behind
// the plain entry points of palora_cuda.h. No torch header, so it compiles in seconds.
#include "cuda/conv_dgrad.cuh"
#include "cuda/conv_wgrad.cuh"
#include "cuda/lora_conv2d.cuh"
#include "cuda/lora_mm.cuh"
#include "cuda/pref_grad.cuh"

namespace palora {

const char* lora_mm_launch(const LoraMMArgs& args, void* stream) { return lora_mm_dispatch(args, stream); }

const char* lora_conv2d_launch(const LoraConvArgs& args, void* stream) {
  return lora_conv2d_dispatch(args, stream);
}

const char* pref_grad_launch(const PrefGradArgs& args, void* stream) { return pref_grad_dispatch(args, stream); }

const char* lora_conv2d_dgrad_launch(const LoraConvDgradArgs& args, void* stream) {
  return lora_conv2d_dgrad_dispatch(args, stream);
}

const char* lora_conv2d_wgrad_launch(const LoraConvWgradArgs& args, void* stream) {
  return lora_conv2d_wgrad_dispatch(args, stream);
}

}  // namespace palora
