#pragma once
// CUDA for g++: what csrc/cuda/cuda_runtime.h takes from the CUDA toolkit when RTDETRV2_CUDA_EMULATION is
// defined. Kernels run on the CPU: every block of a launch, each warp's 32 lanes as fibers of the calling
// thread (emulation.cpp), switching only at warp-synchronous operations, where convergence is checked.
// Built-ins follow the PTX ISA, not the host: conversions saturate, NaN converts as PTX says.
//
// Emulated: the launch and thread indices, __shfl_xor_sync, atomicAdd (float, double, unsigned long long;
// float4 from sm_90), __double2ll_rn, __longlong_as_double, min/max. Not emulated: shared memory,
// __syncthreads, streams and timing; a kernel that uses anything missing fails to compile here.
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <source_location>
#include <string>
#include <type_traits>

#ifndef RTDETRV2_EMULATED_ARCH
#error "the emulated build defines RTDETRV2_EMULATED_ARCH (800 or 900)"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace rtdetrv2_cuda_emulation {

// The emulated thread now running on this OS thread.
struct ThreadState {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern thread_local const ThreadState* current_thread;

// __shfl_xor_sync: every lane of `mask` reaches this call site, then each gets `value` of lane
// (its own ^ lane_mask) within its segment of `width` lanes.
uint64_t warp_exchange(unsigned mask, uint64_t value, int lane_mask, int width, const char* what,
                       const std::source_location& site);

// A device-side fault (what the GPU would report as an illegal or misaligned address): ends the emulated
// thread; the launch then raises with the message.
[[noreturn]] void fault(const std::string& message, const std::source_location& site);

// One launchable kernel instantiation: its name and how often it has been launched.
struct KernelRecord {
  std::string name;
  int64_t launches = 0;
};
KernelRecord* register_kernel(std::string pretty_function);

// "<launches>\t<name>" for every registered instantiation, one a line, sorted by name.
std::string launch_counts();

// Runs body(context) as every thread of a grid*block launch.
void run_grid(KernelRecord& kernel, dim3 grid, dim3 block, void (*body)(void*), void* context);

// "... [with auto Kernel = <the instantiation>]"
template <auto Kernel>
std::string pretty_function() {
  return __PRETTY_FUNCTION__;
}

// Registered when the library loads, for every instantiation that some launch<Kernel> names.
template <auto Kernel>
inline KernelRecord* const kernel_record = register_kernel(pretty_function<Kernel>());

template <typename T>
void check_alignment(const T* address, const std::source_location& site) {
  if (reinterpret_cast<uintptr_t>(address) % alignof(T) != 0) fault("misaligned address in an atomic", site);
}

}  // namespace rtdetrv2_cuda_emulation

#define threadIdx (::rtdetrv2_cuda_emulation::current_thread->thread_idx)
#define blockIdx (::rtdetrv2_cuda_emulation::current_thread->block_idx)
#define blockDim (::rtdetrv2_cuda_emulation::current_thread->block_dim)
#define gridDim (::rtdetrv2_cuda_emulation::current_thread->grid_dim)
constexpr int warpSize = 32;

template <typename T>
  requires(std::is_trivially_copyable_v<T> && sizeof(T) <= 8)
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const std::source_location& site = std::source_location::current()) {
  uint64_t bits = 0;
  __builtin_memcpy(&bits, &var, sizeof(T));
  bits = rtdetrv2_cuda_emulation::warp_exchange(mask, bits, lane_mask, width, "__shfl_xor_sync", site);
  T out;
  __builtin_memcpy(&out, &bits, sizeof(T));
  return out;
}

// atomicAdd returns the old value, as CUDA's does; atomic_ref makes the adds atomic for ThreadSanitizer too.
template <typename T>
  requires(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, unsigned long long>)
T atomicAdd(T* address, T value, const std::source_location& site = std::source_location::current()) {
  rtdetrv2_cuda_emulation::check_alignment(address, site);
  return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}

#if RTDETRV2_EMULATED_ARCH >= 900
// sm_90's vector atomic: each of the four adds is atomic, not the four together; 16-byte alignment required.
inline float4 atomicAdd(float4* address, float4 value,
                        const std::source_location& site = std::source_location::current()) {
  rtdetrv2_cuda_emulation::check_alignment(address, site);
  return {atomicAdd(&address->x, value.x, site), atomicAdd(&address->y, value.y, site),
          atomicAdd(&address->z, value.z, site), atomicAdd(&address->w, value.w, site)};
}
#endif

// cvt.rni.s64.f64 (PTX ISA 9.0): round to nearest even; out-of-range values and infinities clamp to the
// limits; NaN gives the sign bit alone (INT64_MIN). x86's cvtsd2si gives INT64_MIN for every one of them.
inline long long __double2ll_rn(double x) {
  if (std::isnan(x)) return std::numeric_limits<long long>::min();
  if (x >= 0x1p63) return std::numeric_limits<long long>::max();
  if (x < -0x1p63) return std::numeric_limits<long long>::min();
  return static_cast<long long>(std::nearbyint(x));
}

inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }

// CUDA's min and max: integers compared in their common type; floats as fminf/fmaxf (NaN loses).
template <bool kLarger, typename A, typename B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
std::common_type_t<A, B> min_or_max(A a, B b) {
  using T = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<T>) return kLarger ? std::fmax(T(a), T(b)) : std::fmin(T(a), T(b));
  return (T(a) < T(b)) == kLarger ? T(b) : T(a);
}
template <typename A, typename B>
auto min(A a, B b) {
  return min_or_max<false>(a, b);
}
template <typename A, typename B>
auto max(A a, B b) {
  return min_or_max<true>(a, b);
}

// The ops register on CPU tensors under their own namespace (rtdetrv2_kernels_emulated_sm80 or _sm90).
#define RTDETRV2_CUDA_OPS RTDETRV2_EMULATED_OPS
#define RTDETRV2_CUDA_DISPATCH_KEY CPU

namespace rtdetrv2_kernels::gpu {

struct Stream {};
inline Stream current_stream() { return {}; }

// A V100's: 6 MiB of L2, which tests' values fit, so their launches take the policy's choices for values that
// do; 80 SMs, so that tests' small launches run in blocks of 64 threads and larger ones in blocks of 256.
inline int64_t l2_cache_bytes() { return int64_t{6} << 20; }
inline int multiprocessor_count() { return 80; }

struct DeviceGuard {
  explicit DeviceGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "the emulated CUDA kernels run on CPU tensors, got ", device);
  }
};

template <auto Kernel, typename... Args>
void launch(int64_t blocks, int threads, Stream, const Args&... args) {
  TORCH_CHECK(blocks >= 1 && blocks <= std::numeric_limits<int32_t>::max() && threads >= 1 && threads <= 1024,
              "emulated CUDA: invalid launch of ", blocks, " blocks of ", threads, " threads");
  auto body = [&] { Kernel(args...); };
  rtdetrv2_cuda_emulation::run_grid(*rtdetrv2_cuda_emulation::kernel_record<Kernel>, dim3(static_cast<unsigned>(blocks)),
                                    dim3(static_cast<unsigned>(threads)),
                                    [](void* context) { (*static_cast<decltype(body)*>(context))(); }, &body);
}

}  // namespace rtdetrv2_kernels::gpu

// Device code from here on sees the emulated architecture.
#define __CUDA_ARCH__ RTDETRV2_EMULATED_ARCH
