#pragma once
// The one seam between the CUDA sources and the CUDA runtime: the headers the kernels' host code needs, and
// the few runtime pieces a host compiler cannot see (the launch, the current stream, the device guard, the
// L2 size, the op namespace the kernels register under). nvcc builds take the real ones. The test suite compiles the same
// sources with g++ for the CPU (tests/emulated_cuda/) with RTDETRV2_CUDA_EMULATION defined, and then the
// emulation supplies these names, __CUDA_ARCH__ and the CUDA built-ins, and runs every launch on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#if defined(RTDETRV2_CUDA_EMULATION)
#include "cuda_emulation.h"  // on the include path of the emulated build only
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

// TORCH_LIBRARY_IMPL(RTDETRV2_CUDA_OPS, RTDETRV2_CUDA_DISPATCH_KEY, m) registers the kernels.
#define RTDETRV2_CUDA_OPS rtdetrv2_kernels
#define RTDETRV2_CUDA_DISPATCH_KEY CUDA

namespace rtdetrv2_kernels::gpu {

using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::OptionalCUDAGuard;

inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }

// What the launch policy asks of the current GPU: its L2 size in bytes (does value fit?) and its SMs.
inline int64_t l2_cache_bytes() { return at::cuda::getCurrentDeviceProperties()->l2CacheSize; }
inline int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Kernel<<<blocks, threads, 0, stream>>>(args...), then the launch check. The kernel is a template argument
// so that the emulation can name (and count) every instantiation that is launched.
template <auto Kernel, typename... Args>
void launch(int64_t blocks, int threads, Stream stream, const Args&... args) {
  Kernel<<<blocks, threads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace rtdetrv2_kernels::gpu
#endif
