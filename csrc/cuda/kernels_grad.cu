// An nvcc translation unit: the conv weight gradient and d(preference) (csrc/cuda/conv_wgrad.cuh,
// pref_grad.cuh) behind their plain entry points.
#include "cuda/conv_wgrad.cuh"
#include "cuda/pref_grad.cuh"

namespace palora {

const char* lora_conv2d_wgrad_launch(const LoraConvWgradArgs& args, void* stream) {
  return lora_conv2d_wgrad_dispatch(args, stream);
}

const char* pref_grad_launch(const PrefGradArgs& args, void* stream) { return pref_grad_dispatch(args, stream); }

}  // namespace palora
