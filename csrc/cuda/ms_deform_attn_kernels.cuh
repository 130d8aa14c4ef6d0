#pragma once
// The CUDA kernels of multi-scale deformable attention, forward and backward, both sampling methods: device
// code only, free of ATen, so that nvcc 11.8 can compile it in C++17 for GPGPU-Sim (bench/gpusim/) as well as
// the torch build's nvcc (ms_deform_attn_cuda.cu, the launch code) and the emulated build's g++. The includer
// provides the CUDA built-ins (nvcc does; the emulation through the seam cuda_runtime.h).
//
// A (batch, query, head) is served by a group of adjacent lanes, each owning VEC consecutive channels
// (16 bytes: 4 fp32 or 8 fp16/bf16 channels; VEC = 1 when C or the strides do not allow it). The lanes of a
// group read the same location and weight, which the cache serves once; each lane gathers its channels of
// the four corners with one vector load apiece, all four issued before use. The backward scatters into
// grad_value with atomics on an fp32 (fp64 for fp64) buffer, four floats per atomic on sm_90, and reduces
// the location and weight gradients over the group's lanes with warp shuffles when the group size is a power
// of two up to 32 (atomics otherwise). In deterministic mode grad_value accumulates in 64-bit fixed point
// instead, whose integer additions give the same bits in any order (FixedPointSink).
// Level shapes travel in the kernel arguments (LevelParams), so no launch needs a device table or a sync; the
// tensor form of the op reads them from device memory instead (DeviceLevels), which needs no sync either.
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "../fused_prologue.h"
#include "../sampling.h"

namespace rtdetrv2_kernels {

constexpr int kMaxLevels = 16;
constexpr int kThreadsPerBlock = 256;

// The type the kernels accumulate in: fp64 for fp64, else fp32 (as at::opmath_type for the four dtypes).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// What a kernel reads of one level: its size and its first row in value.
struct LevelGeometry {
  int32_t height, width;
  int64_t start;
};

// The level table as kernel arguments (the list form, checked on the host).
struct LevelParams {
  int32_t height[kMaxLevels];
  int32_t width[kMaxLevels];
  int32_t points[kMaxLevels];
  int64_t start[kMaxLevels];
  int32_t num_levels;

  __device__ __forceinline__ LevelGeometry level(int l) const { return {height[l], width[l], start[l]}; }
};

// The level table in device memory (the tensor form): shapes (L, 2) and starts (L,) in int64, read by each
// thread as it reaches a level. The host cannot check them without a sync, so the kernel does: a level that
// is empty, too large for int32 offsets or not wholly inside value's rows reads as size 0x0, which no sample
// reads (sampling.h), so the level contributes zero and gets zero gradients.
// The point counts stay kernel arguments, in the LevelParams base (its height, width and start stay zero;
// level() below hides the base's). Besides sharing the list form's layout, that keeps the argument above
// 128 bytes: nvcc copies a smaller one that the kernel indexes at run time into local memory (measured with
// ptxas on sm_90: a 96-byte stack frame in every kernel), which the fast path must not have.
struct DeviceLevels : LevelParams {
  const int64_t* shapes;
  const int64_t* starts;
  int64_t rows;

  __device__ __forceinline__ LevelGeometry level(int l) const {
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1], start = starts[l];
    // Each side is bounded before the product, so that the product fits in int64.
    const bool valid = height > 0 && width > 0 && height <= INT32_MAX && width <= INT32_MAX &&
                       height * width <= INT32_MAX && start >= 0 && start <= rows - height * width;
    return {valid ? static_cast<int32_t>(height) : 0, valid ? static_cast<int32_t>(width) : 0, valid ? start : 0};
  }
};

// Sizes and value's strides (in elements); lanes = channel groups of VEC per (batch, query, head); rows = S.
struct Geometry {
  int64_t queries, heads, channels, points, lanes, rows;
  int64_t stride_b, stride_s, stride_h;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Vec<scalar_t, VEC> load_row(const scalar_t* rows, int32_t offset, int64_t stride,
                                                       bool inside) {
  Vec<scalar_t, VEC> out;
  if (inside) {
    out = *reinterpret_cast<const Vec<scalar_t, VEC>*>(rows + offset * stride);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = scalar_t(0);
  }
  return out;
}

// Where the kernels' per-point inputs come from. Each calls f(level, point, weight, loc_x, loc_y) for the
// points of one (batch, query, head), levels in order. PlainPoints reads the plain op's locations and
// weights, with either level table; FusedPoints computes them from the fused op's inputs (fused_prologue.h),
// whose level shapes are kernel arguments.
template <typename scalar_t>
struct PlainPoints {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* locations;
  const scalar_t* weights;
  int64_t points;

  template <typename Levels, typename F>
  __device__ __forceinline__ void visit(int64_t bqh, const Levels& levels, const F& f) const {
    int64_t p = 0;
    for (int l = 0; l < levels.num_levels; ++l) {
      for (int i = 0; i < levels.points[l]; ++i, ++p) {
        const int64_t point = bqh * points + p;
        f(l, p, static_cast<acc_t>(weights[point]), static_cast<acc_t>(locations[2 * point]),
          static_cast<acc_t>(locations[2 * point + 1]));
      }
    }
  }
};

template <typename scalar_t>
struct FusedPoints {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* reference;  // contiguous (B, Q, R, K)
  const scalar_t* offsets;    // contiguous (B, Q, H, P, 2)
  const scalar_t* logits;     // contiguous (B, Q, H, P)
  int64_t heads, points, reference_rows, reference_size;
  acc_t offset_scale;

  __device__ __forceinline__ FusedPrologue<scalar_t, acc_t, LevelParams> prologue(const LevelParams& levels) const {
    return {reference, offsets, logits, heads, points, reference_rows, reference_size, offset_scale,
            levels.num_levels, levels};
  }
  template <typename F>
  __device__ __forceinline__ void visit(int64_t bqh, const LevelParams& levels, const F& f) const {
    prologue(levels).visit(bqh, f);
  }
};

template <typename scalar_t, int VEC, bool kDiscrete, typename Points, typename Levels>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_kernel(const scalar_t* __restrict__ value, const Points points, scalar_t* __restrict__ output,
                   Geometry g, Levels levels, int64_t total_lanes) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (tid >= total_lanes) return;
  const int64_t lane = tid % g.lanes;
  const int64_t bqh = tid / g.lanes;
  const int64_t h = bqh % g.heads;
  const int64_t b = bqh / (g.heads * g.queries);
  const scalar_t* value_bh = value + b * g.stride_b + h * g.stride_h + lane * VEC;
  acc_t acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
  points.visit(bqh, levels, [&](int64_t l, int64_t, acc_t w, acc_t loc_x, acc_t loc_y) {
    const LevelGeometry level = levels.level(l);
    const int32_t height = level.height, width = level.width;
    const scalar_t* rows = value_bh + level.start * g.stride_s;
    if constexpr (kDiscrete) {
      const int32_t offset = discrete_offset(loc_x, loc_y, height, width);
      const auto v = load_row<scalar_t, VEC>(rows, offset, g.stride_s, offset >= 0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += w * static_cast<acc_t>(v.v[j]);
    } else {
      const auto corners = bilinear_corners(loc_x, loc_y, height, width);
      Vec<scalar_t, VEC> v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = load_row<scalar_t, VEC>(rows, corners.offset[k], g.stride_s, corners.inside[k]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] += w * (corners.weight[0] * static_cast<acc_t>(v[0].v[j]) +
                       corners.weight[1] * static_cast<acc_t>(v[1].v[j]) +
                       corners.weight[2] * static_cast<acc_t>(v[2].v[j]) +
                       corners.weight[3] * static_cast<acc_t>(v[3].v[j]));
      }
    }
  });
  Vec<scalar_t, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<scalar_t>(acc[j]);
  *reinterpret_cast<Vec<scalar_t, VEC>*>(output + bqh * g.channels + lane * VEC) = out;
}

// Sum over the `lanes` adjacent lanes of a group (a power of two up to 32, groups aligned in the warp).
template <typename T>
__device__ __forceinline__ T group_sum(T value, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Adds a group's partial gradients: one shuffle-reduced store by the group's first lane, or an atomic add
// per lane into a zeroed buffer.
template <bool kShuffle, typename acc_t>
__device__ __forceinline__ void add_group_partial(acc_t* target, acc_t partial, int lanes, bool first_lane,
                                                  bool active) {
  if constexpr (kShuffle) {
    partial = group_sum(partial, lanes);
    if (active && first_lane) *target = partial;
  } else {
    if (active) atomicAdd(target, partial);
  }
}

// Where the backward adds grad_value contributions. FloatSink: atomic adds on a zeroed acc_t buffer, fast but
// rounded in whatever order the atomics land. FixedPointSink: each contribution becomes round(v * scale) and is
// added as a 64-bit integer into a zeroed buffer, so the sum is the same in any order; scale is a power of two
// chosen from a bound on any element's total (fixed_point_scale_kernel), which keeps every partial sum below
// 2^62 and resolves contributions down to 2^-62 of that bound, finer than fp32 rounding of any element
// larger than 2^-38 of it.
template <typename acc_t>
struct FloatSink {
  acc_t* data;
  __device__ __forceinline__ FloatSink ready() const { return *this; }
  __device__ __forceinline__ void add(int64_t index, acc_t v) const { atomicAdd(data + index, v); }
  // data[index + j] += scale * g[j] for j < VEC; index is a multiple of VEC.
  template <int VEC>
  __device__ __forceinline__ void add_scaled(int64_t index, acc_t scale, const acc_t (&g)[VEC]) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Hopper adds four floats in one atomic (16-byte aligned: the buffer is, and index is a multiple of 4).
    if constexpr (std::is_same_v<acc_t, float> && VEC % 4 == 0) {
#pragma unroll
      for (int j = 0; j < VEC; j += 4) {
        atomicAdd(reinterpret_cast<float4*>(data + index + j),
                  make_float4(scale * g[j], scale * g[j + 1], scale * g[j + 2], scale * g[j + 3]));
      }
      return;
    }
#endif
#pragma unroll
    for (int j = 0; j < VEC; ++j) add(index + j, scale * g[j]);
  }
};

struct FixedPointSink {
  unsigned long long* data;
  const double* scale_pointer;  // a device scalar: the kernels read it, so choosing it needs no sync
  // Counts non-finite contributions (a NaN or infinite logit of the fused op, which the bound does not
  // see): integers cannot hold them, so fixed_point_to_float_kernel then writes NaN everywhere.
  unsigned long long* non_finite;
  double scale;
  __device__ __forceinline__ FixedPointSink ready() const { return {data, scale_pointer, non_finite, *scale_pointer}; }
  __device__ __forceinline__ void add(int64_t index, double v) const {
    const double scaled = v * scale;
    if (!(fabs(scaled) <= DBL_MAX)) {
      atomicAdd(non_finite, 1ull);
      return;
    }
    // Two's complement: adding the unsigned image of a negative integer subtracts it.
    atomicAdd(data + index, static_cast<unsigned long long>(__double2ll_rn(scaled)));
  }
  // In fp64: factor * g can overflow fp32 where the fp64 bound does not.
  template <int VEC, typename acc_t>
  __device__ __forceinline__ void add_scaled(int64_t index, acc_t factor, const acc_t (&g)[VEC]) const {
#pragma unroll
    for (int j = 0; j < VEC; ++j) add(index + j, static_cast<double>(factor) * static_cast<double>(g[j]));
  }
};

// scale = 2^(62 - e) for the bound < 2^e; 0 when the bound is not finite (a NaN or infinite weight or
// output gradient), which fixed_point_to_float_kernel turns into a grad_value that is NaN everywhere, as it
// does when any contribution was not finite.
__global__ void fixed_point_scale_kernel(const double* __restrict__ bound, double* __restrict__ scale) {
  const double b = *bound;
  if (!(b <= DBL_MAX)) {
    *scale = 0.0;
    return;
  }
  int exponent = 0;
  frexp(b, &exponent);
  *scale = ldexp(1.0, min(62 - exponent, 1000));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    fixed_point_to_float_kernel(const long long* __restrict__ sums, const double* __restrict__ scale,
                                const unsigned long long* __restrict__ non_finite, scalar_t* __restrict__ out,
                                int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const double s = *scale;
  const double quiet_nan = __longlong_as_double(0x7ff8000000000000LL);
  out[i] = static_cast<scalar_t>(s == 0.0 || *non_finite != 0 ? quiet_nan : static_cast<double>(sums[i]) / s);
}

// grad_locations and grad_weights are in acc_t and zeroed when kShuffle is false; grad_value is contiguous
// (B, S, H, C), added to through the sink. With kShuffle every lane of a warp runs the whole
// loop (inactive lanes on zeros) so that the shuffles see full warps.
template <typename scalar_t, int VEC, bool kDiscrete, bool kShuffle, typename Points, typename Levels, typename Sink>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const Points points, const Sink grad_value_sink,
                    acc_type<scalar_t>* __restrict__ grad_locations,
                    acc_type<scalar_t>* __restrict__ grad_weights, Geometry g, Levels levels,
                    int64_t total_lanes) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const bool active = tid < total_lanes;
  if (!kShuffle && !active) return;
  const int64_t lane_id = active ? tid : 0;
  const int64_t lane = lane_id % g.lanes;
  const int64_t bqh = lane_id / g.lanes;
  const int64_t h = bqh % g.heads;
  const int64_t b = bqh / (g.heads * g.queries);
  const scalar_t* value_bh = value + b * g.stride_b + h * g.stride_h + lane * VEC;
  const Sink grad_value = grad_value_sink.ready();
  const int64_t grad_bh = (b * g.rows * g.heads + h) * g.channels + lane * VEC;
  const int64_t grad_stride_s = g.heads * g.channels;
  acc_t grad_out[VEC];
  {
    const auto go = *reinterpret_cast<const Vec<scalar_t, VEC>*>(grad_output + bqh * g.channels + lane * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) grad_out[j] = active ? static_cast<acc_t>(go.v[j]) : acc_t(0);
  }
  const int lanes = static_cast<int>(g.lanes);
  const bool first_lane = lane == 0;
  points.visit(bqh, levels, [&](int64_t l, int64_t p, acc_t w, acc_t loc_x, acc_t loc_y) {
    const LevelGeometry level = levels.level(l);
    const int32_t height = level.height, width = level.width;
    const scalar_t* rows = value_bh + level.start * g.stride_s;
    const int64_t grad_rows = grad_bh + level.start * grad_stride_s;
    const int64_t point = bqh * g.points + p;
    acc_t grad_w = 0, grad_x = 0, grad_y = 0;
    if constexpr (kDiscrete) {
      const int32_t offset = discrete_offset(loc_x, loc_y, height, width);
      if (active && offset >= 0) {
        const auto v = load_row<scalar_t, VEC>(rows, offset, g.stride_s, true);
#pragma unroll
        for (int j = 0; j < VEC; ++j) grad_w += grad_out[j] * static_cast<acc_t>(v.v[j]);
        grad_value.template add_scaled<VEC>(grad_rows + offset * grad_stride_s, w, grad_out);
      }
    } else {
      const auto corners = bilinear_corners(loc_x, loc_y, height, width);
      Vec<scalar_t, VEC> v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        v[k] = load_row<scalar_t, VEC>(rows, corners.offset[k], g.stride_s, active && corners.inside[k]);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        acc_t dot = 0;
#pragma unroll
        for (int j = 0; j < VEC; ++j) dot += grad_out[j] * static_cast<acc_t>(v[k].v[j]);
        grad_w += corners.weight[k] * dot;
        grad_x += corners.dweight_dx[k] * dot;
        grad_y += corners.dweight_dy[k] * dot;
        if (active && corners.inside[k]) {
          grad_value.template add_scaled<VEC>(grad_rows + corners.offset[k] * grad_stride_s, w * corners.weight[k],
                                              grad_out);
        }
      }
      // Chain rule through x = loc_x * W - 0.5 and y = loc_y * H - 0.5.
      grad_x *= w * width;
      grad_y *= w * height;
    }
    add_group_partial<kShuffle>(grad_weights + point, grad_w, lanes, first_lane, active);
    add_group_partial<kShuffle>(grad_locations + 2 * point, grad_x, lanes, first_lane, active);
    add_group_partial<kShuffle>(grad_locations + 2 * point + 1, grad_y, lanes, first_lane, active);
  });
}

// The fused op's backward, after backward_kernel has left the gradients of the (computed) weights and
// locations in grad_weights and grad_locations: one thread per (batch, query, head) applies the softmax and
// location chain rules (fused_prologue.h).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    fused_backpropagate_kernel(const FusedPoints<scalar_t> points, LevelParams levels,
                               const acc_type<scalar_t>* __restrict__ grad_weights,
                               const acc_type<scalar_t>* __restrict__ grad_locations,
                               scalar_t* __restrict__ grad_logits, scalar_t* __restrict__ grad_offsets,
                               acc_type<scalar_t>* __restrict__ grad_reference, int64_t total_bqh) {
  const int64_t bqh = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bqh >= total_bqh) return;
  points.prologue(levels).backpropagate(bqh, grad_weights + bqh * points.points,
                                        grad_locations + 2 * bqh * points.points, grad_logits, grad_offsets,
                                        grad_reference + bqh * points.reference_rows * points.reference_size);
}

}  // namespace rtdetrv2_kernels
