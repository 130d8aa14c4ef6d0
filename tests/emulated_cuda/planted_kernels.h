#pragma once
// Kernels with planted defects, each of which the emulation must report as a GPU tool would: an
// out-of-bounds read (AddressSanitizer), two lanes storing to one address (ThreadSanitizer), shuffles whose
// lanes do not converge (the emulation's own check), a misaligned atomic and an exception (device faults),
// and a legal half-warp pattern that must pass.
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>

#include "cuda_emulation.h"

namespace rtdetrv2_cuda_emulation {
namespace planted {

// Each thread copies data[i + 1] into data[i]: the last one reads one element past the end.
__global__ void read_past_end(float* data, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) {
    const float next = data[i + 1];
    data[i] = next;
  }
}

// Every thread stores to data[0] without an atomic.
__global__ void racing_store(float* data) { data[0] = static_cast<float>(threadIdx.x); }

// Lane 5 returns before the full-warp shuffle.
__global__ void shuffle_after_return(float* data) {
  if (threadIdx.x == 5) return;
  data[threadIdx.x] = __shfl_xor_sync(0xffffffffu, data[threadIdx.x], 1);
}

// Each half-warp shuffles among itself, from its own branch: legal on every GPU since Volta.
__global__ void half_warp_shuffles(float* data) {
  const unsigned lane = threadIdx.x % 32;
  if (lane < 16) {
    data[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, data[threadIdx.x], 1);
  } else {
    data[threadIdx.x] = __shfl_xor_sync(0xffff0000u, data[threadIdx.x], 2);
  }
}

// The lower half-warp's mask, but xor 16 reads lanes of the upper half.
__global__ void shuffle_outside_mask(float* data) {
  if (threadIdx.x < 16) data[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, data[threadIdx.x], 16);
}

// Both halves of the warp shuffle with the full mask, from different call sites.
__global__ void shuffle_at_two_sites(float* data) {
  if (threadIdx.x < 16) {
    data[threadIdx.x] = __shfl_xor_sync(0xffffffffu, data[threadIdx.x], 1);
  } else {
    data[threadIdx.x] = __shfl_xor_sync(0xffffffffu, data[threadIdx.x], 1);
  }
}

// A C++ exception thrown on a lane's stack (the unwinder needs the ABI's stack alignment there).
__global__ void throws(float*) { throw std::runtime_error("planted exception"); }

// An atomic on an address that is not a multiple of its size: a GPU faults ("misaligned address").
__global__ void misaligned_atomic(float* data) { atomicAdd(reinterpret_cast<double*>(data + 1), 1.0); }

}  // namespace planted

// Launches planted kernel `name` over data (a contiguous float32 CPU tensor of at least 32 elements).
inline void run_planted_kernel(c10::string_view name, const at::Tensor& data) {
  using namespace planted;
  namespace gpu = rtdetrv2_kernels::gpu;
  TORCH_CHECK(data.is_cpu() && data.scalar_type() == at::kFloat && data.is_contiguous() && data.numel() >= 32,
              "planted_kernel: data must be a contiguous float32 CPU tensor of at least 32 elements");
  float* p = data.mutable_data_ptr<float>();
  const int64_t n = data.numel();
  const gpu::Stream stream = gpu::current_stream();
  const std::pair<const char*, std::function<void()>> kernels[] = {
      {"read_past_end", [&] { gpu::launch<read_past_end>((n + 31) / 32, 32, stream, p, n); }},
      {"racing_store", [&] { gpu::launch<racing_store>(1, 32, stream, p); }},
      {"shuffle_after_return", [&] { gpu::launch<shuffle_after_return>(1, 32, stream, p); }},
      {"half_warp_shuffles", [&] { gpu::launch<half_warp_shuffles>(1, 32, stream, p); }},
      {"shuffle_outside_mask", [&] { gpu::launch<shuffle_outside_mask>(1, 32, stream, p); }},
      {"shuffle_at_two_sites", [&] { gpu::launch<shuffle_at_two_sites>(1, 32, stream, p); }},
      {"throws", [&] { gpu::launch<throws>(1, 32, stream, p); }},
      {"misaligned_atomic", [&] { gpu::launch<misaligned_atomic>(1, 1, stream, p); }},
  };
  for (const auto& [kernel_name, run] : kernels) {
    if (name == kernel_name) return run();
  }
  TORCH_CHECK(false, "planted_kernel: no kernel named ", name);
}

}  // namespace rtdetrv2_cuda_emulation
