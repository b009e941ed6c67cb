// The emulated kernels as a C API for ctypes (palora_kernels/ops/cuda_sim.py), tests only.
// The very same csrc/cuda/*.cuh source as the kernels_*.cu, compiled by g++ with -DPALORA_EMU:
//   g++ -O2 -std=c++17 -shared -fPIC -DPALORA_EMU -Icsrc csrc/emu/emu_capi.cpp -o libpalora_emu.so
#ifndef PALORA_EMU
#error "compile with -DPALORA_EMU"
#endif
#include "cuda/conv_dgrad.cuh"
#include "cuda/conv_wgrad.cuh"
#include "cuda/lora_conv2d.cuh"
#include "cuda/lora_mm.cuh"
#include "cuda/mtlora_mm.cuh"
#include "cuda/pref_grad.cuh"
#include "emu/selftest.cuh"

extern "C" {

const char* palora_emu_lora_mm(const palora::LoraMMArgs* args) { return palora::lora_mm_dispatch(*args, nullptr); }

const char* palora_emu_lora_conv2d(const palora::LoraConvArgs* args) {
  return palora::lora_conv2d_dispatch(*args, nullptr);
}

const char* palora_emu_lora_conv2d_dgrad(const palora::LoraConvDgradArgs* args) {
  return palora::lora_conv2d_dgrad_dispatch(*args, nullptr);
}

const char* palora_emu_lora_conv2d_wgrad(const palora::LoraConvWgradArgs* args) {
  return palora::lora_conv2d_wgrad_dispatch(*args, nullptr);
}

long long palora_emu_lora_conv2d_wgrad_workspace(const palora::LoraConvWgradArgs* args) {
  return palora::lora_conv2d_wgrad_workspace(*args);
}

const char* palora_emu_pref_grad(const palora::PrefGradArgs* args) { return palora::pref_grad_dispatch(*args, nullptr); }

const char* palora_emu_mtlora_mm(const palora::MTLoraMMArgs* args) { return palora::mtlora_mm_dispatch(*args, nullptr); }

const char* palora_emu_mtlora_mm_dgrad(const palora::MTLoraDgradArgs* args) {
  return palora::mtlora_mm_dgrad_dispatch(*args, nullptr);
}

long long palora_emu_pref_grad_workspace(const palora::PrefGradArgs* args) { return palora::pref_grad_workspace(*args); }

// 0 forward, 1 reverse, 2 seeded shuffle: the order fibers run in between two barriers
void palora_emu_set_schedule(int schedule, unsigned long long seed) {
  palora_emu::rt.schedule = schedule;
  palora_emu::rt.seed = seed;
}

// counters since load: launches, blocks, barriers released, fiber switches
void palora_emu_stats(long long* out4) {
  const auto& s = palora_emu::rt.stats;
  out4[0] = s.launches; out4[1] = s.blocks; out4[2] = s.barriers; out4[3] = s.switches;
}

// emulator self-checks: 0 shared-memory reduction (out[0..1] = 8128), 1 barrier divergence
// (must fail), 2 misaligned WMMA load (must fail), 3 cp.async read before/after its wait
// (out[0] NaN, out[1] = 42), 4 FastDiv against / and %; returns the emulator's error or NULL
const char* palora_emu_selftest(int which, float* out) { return emu_selftest::run(which, out); }

// cp.async copies issued since load (the 16-byte fast path ran)
long long palora_emu_async_copies() { return palora_emu::rt.stats.async_copies; }

int palora_emu_cpasync_wait_broken() {
#ifdef PALORA_BREAK_CPASYNC_WAIT
  return 1;
#else
  return 0;
#endif
}

int palora_emu_barrier_broken() {
#ifdef PALORA_BREAK_BARRIER
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
