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
#include <initializer_list>
#include <type_traits>

#include "../fused_prologue.h"
#include "../sampling.h"

namespace rtdetrv2_kernels {

constexpr int kMaxLevels = 16;
constexpr int kThreadsPerBlock = 256;
// __launch_bounds__'s second argument: at least two blocks per SM, up to 128 registers a thread. Without it,
// ptxas (CUDA 13, sm_90) holds some kernels to the register counts of full occupancy and spills to do so
// (bench/ptxas_report.py --check failed on two fast-path kernels); with it none spills.
constexpr int kMinBlocksPerSM = 2;

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

// Where the kernels' per-point inputs come from. visit(bqh, levels, first, stride, rounds, f) calls
// f(level geometry, point, weight, loc_x, loc_y) for `rounds` of one (batch, query, head)'s points, rounds first,
// first + stride, ... in PointWalk's order (fused_prologue.h): one lane's share of them. Rounds past the points
// call f(a valid level, p >= points, 0, 0, 0), so that the lanes of a group can all make the same calls, from
// one call site. PlainPoints reads the plain op's locations and weights, with either level table; FusedPoints
// computes them from the fused op's inputs (fused_prologue.h), whose level shapes are kernel arguments.
template <typename scalar_t>
struct PlainPoints {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* locations;
  const scalar_t* weights;
  int64_t points;

  template <bool kLastLevelFirst, typename Levels, typename F>
  __device__ __forceinline__ void visit(int64_t bqh, const Levels& levels, int32_t first, int32_t stride,
                                        int32_t rounds, const F& f) const {
    // One call site, reached once per round whatever the level (see FusedPrologue::visit).
    PointWalk<kLastLevelFirst, Levels> walk(levels, levels.num_levels, static_cast<int32_t>(points));
    for (int32_t round = 0, r = first; round < rounds; ++round, r += stride) {
      const int32_t p = walk.point(r);
      walk.seek(p);
      const bool real = p < points;
      const int64_t point = bqh * points + (real ? p : 0);
      f(levels.level(walk.level), p, real ? static_cast<acc_t>(weights[point]) : acc_t(0),
        real ? static_cast<acc_t>(locations[2 * point]) : acc_t(0),
        real ? static_cast<acc_t>(locations[2 * point + 1]) : acc_t(0));
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
  template <bool kLastLevelFirst, typename F>
  __device__ __forceinline__ void visit(int64_t bqh, const LevelParams& levels, int32_t first, int32_t stride,
                                        int32_t rounds, const F& f) const {
    prologue(levels).template visit<kLastLevelFirst>(bqh, first, stride, rounds,
                                                     [&](int32_t level, int32_t p, acc_t w, acc_t x, acc_t y) {
      f(levels.level(level), p, w, x, y);
    });
  }
};

// A (batch, query, head) is served by a group of lanes: g.lanes channel lanes (adjacent, each owning VEC
// channels) times kPointLanes point lanes, which split its points (point lane i takes points i, i +
// kPointLanes, ...): more lanes, and fewer points each, for more gathers in flight at small batches, where a
// lane walking all of a head's points one after another waits on memory. Lane id within the grid:
// (bqh * kPointLanes + point lane) * g.lanes + channel lane.
struct Lane {
  int64_t bqh, channel;
  int32_t point;
  __device__ __forceinline__ Lane(int64_t lane_id, int64_t channel_lanes, int32_t point_lanes)
      : bqh(lane_id / channel_lanes / point_lanes),
        channel(lane_id % channel_lanes),
        point(static_cast<int32_t>(lane_id / channel_lanes % point_lanes)) {}
};

// Points a point lane takes of `points`.
__device__ __forceinline__ int32_t rounds_of(int32_t point_lane, int32_t point_lanes, int64_t points) {
  return point_lane < points ? static_cast<int32_t>((points - point_lane + point_lanes - 1) / point_lanes) : 0;
}

// __shfl_xor_sync(0xffffffff, value, offset) of a float or double. GPGPU-Sim 4.2 mis-executes the instruction
// in the form nvcc emits for the intrinsic, with a predicate destination (shfl.sync.bfly.b32 d|p, ...): the
// simulation harness (bench/gpusim/) defines RTDETRV2_GPUSIM_SHUFFLES for the same instruction without it.
template <typename T>
__device__ __forceinline__ T shuffle_xor(T value, int offset) {
#if defined(RTDETRV2_GPUSIM_SHUFFLES)
  if constexpr (sizeof(T) == 8) {
    const int hi = shuffle_xor(__double2hiint(value), offset), lo = shuffle_xor(__double2loint(value), offset);
    return __hiloint2double(hi, lo);
  } else {
    T shuffled;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=r"(reinterpret_cast<unsigned&>(shuffled))
                 : "r"(reinterpret_cast<const unsigned&>(value)), "r"(offset));
    return shuffled;
  }
#else
  return __shfl_xor_sync(0xffffffffu, value, offset);
#endif
}

// Sum over `count` lanes `stride` apart (powers of two, count * stride up to 32, groups aligned in the warp).
template <typename T>
__device__ __forceinline__ T strided_sum(T value, int stride, int count) {
  for (int offset = stride * count / 2; offset >= stride; offset /= 2) value += shuffle_xor(value, offset);
  return value;
}

// Sum over the `lanes` adjacent lanes of a group.
template <typename T>
__device__ __forceinline__ T group_sum(T value, int lanes) {
  return strided_sum(value, 1, lanes);
}

// Output (B, Q, H*C). With point lanes, every lane of a group runs to the shuffles that sum the point lanes'
// partial outputs (lanes past the end on bqh 0, with no points), then the first point lane stores.
template <typename scalar_t, int VEC, int kPointLanes, bool kDiscrete, typename Points, typename Levels>
__global__ void __launch_bounds__(kThreadsPerBlock, kMinBlocksPerSM)
    forward_kernel(const scalar_t* __restrict__ value, const Points points, scalar_t* __restrict__ output,
                   Geometry g, Levels levels, int64_t total_lanes) {
  using acc_t = acc_type<scalar_t>;
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const bool active = tid < total_lanes;
  if (kPointLanes == 1 && !active) return;
  const Lane lane(active ? tid : 0, g.lanes, kPointLanes);
  const int64_t h = lane.bqh % g.heads;
  const int64_t b = lane.bqh / (g.heads * g.queries);
  const scalar_t* value_bh = value + b * g.stride_b + h * g.stride_h + lane.channel * VEC;
  acc_t acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
  const int32_t rounds = active ? rounds_of(lane.point, kPointLanes, g.points) : 0;
  constexpr bool kLastLevelFirst = true;  // PointWalk
  points.template visit<kLastLevelFirst>(lane.bqh, levels, lane.point, kPointLanes, rounds,
                                         [&](const LevelGeometry& level, int32_t, acc_t w, acc_t loc_x, acc_t loc_y) {
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
  if constexpr (kPointLanes > 1) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = strided_sum(acc[j], static_cast<int>(g.lanes), kPointLanes);
  }
  if (!active || lane.point != 0) return;
  Vec<scalar_t, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<scalar_t>(acc[j]);
  *reinterpret_cast<Vec<scalar_t, VEC>*>(output + lane.bqh * g.channels + lane.channel * VEC) = out;
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

// A lane's output gradients, in the two channel layouts its grad_value atomics can take: blocked, channels
// channel * VEC + j (the layout of its value loads, which its dot products need), and spread, channels
// j * lanes + channel, in which one atomic instruction of a group's lanes covers contiguous addresses (a
// single sector for 8 fp32 lanes) where the blocked layout scatters it over VEC times as many sectors.
template <typename acc_t, int VEC>
struct LaneGradient {
  acc_t blocked[VEC];
  acc_t spread[VEC];
  int64_t channel, lanes;
};

// Where the backward adds grad_value contributions: add_row(row, scale, g) adds scale * (output gradient) to
// one head's C channels at grad_value[row ...], this lane's share of them. FloatSink: atomic adds on a zeroed
// acc_t buffer, fast but rounded in whatever order the atomics land. FixedPointSink: each contribution
// becomes round(v * scale) and is added as a 64-bit integer into a zeroed buffer, so the sum is the same in
// any order; scale is a power of two chosen from a bound on any element's total (fixed_point_scale_kernel),
// which keeps every partial sum below 2^62 and resolves contributions down to 2^-62 of that bound, finer than
// fp32 rounding of any element larger than 2^-38 of it.
// Hopper adds four floats in one atomic.
template <typename acc_t, int VEC>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kFourFloatAtomics = std::is_same_v<acc_t, float> && VEC % 4 == 0;
#else
constexpr bool kFourFloatAtomics = false;
#endif

template <typename acc_t>
struct FloatSink {
  acc_t* data;
  __device__ __forceinline__ FloatSink ready() const { return *this; }
  template <int VEC>
  __device__ __forceinline__ void add_row(int64_t row, acc_t scale, const LaneGradient<acc_t, VEC>& g) const {
    if constexpr (kFourFloatAtomics<acc_t, VEC>) {
      // Blocked: 16-byte aligned, as the buffer is and so is each lane's first channel.
      acc_t* lane_row = data + row + g.channel * VEC;
#pragma unroll
      for (int j = 0; j < VEC; j += 4) {
        atomicAdd(reinterpret_cast<float4*>(lane_row + j),
                  make_float4(scale * g.blocked[j], scale * g.blocked[j + 1], scale * g.blocked[j + 2],
                              scale * g.blocked[j + 3]));
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) atomicAdd(data + row + j * g.lanes + g.channel, scale * g.spread[j]);
    }
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
  __device__ __forceinline__ void add_row(int64_t row, acc_t factor, const LaneGradient<acc_t, VEC>& g) const {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      add(row + j * g.lanes + g.channel, static_cast<double>(factor) * static_cast<double>(g.spread[j]));
    }
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
__global__ void __launch_bounds__(kThreadsPerBlock, kMinBlocksPerSM)
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
// (B, S, H, C), added to through the sink. With kShuffle (channel lanes a power of two up to 32) each point's
// gradients are summed over its channel lanes with shuffles, so every lane of a warp runs the same rounds
// (lanes past the end on bqh 0, rounds past their points with nothing read or added) to see full warps;
// without, kPointLanes is 1 and the lanes add with atomics.
template <typename scalar_t, int VEC, int kPointLanes, bool kDiscrete, bool kShuffle, typename Points,
          typename Levels, typename Sink>
__global__ void __launch_bounds__(kThreadsPerBlock, kMinBlocksPerSM)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const Points points, const Sink grad_value_sink,
                    acc_type<scalar_t>* __restrict__ grad_locations,
                    acc_type<scalar_t>* __restrict__ grad_weights, Geometry g, Levels levels,
                    int64_t total_lanes) {
  static_assert(kShuffle || kPointLanes == 1, "point lanes need shuffles");
  using acc_t = acc_type<scalar_t>;
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const bool active = tid < total_lanes;
  if (!kShuffle && !active) return;
  const Lane lane(active ? tid : 0, g.lanes, kPointLanes);
  const int64_t h = lane.bqh % g.heads;
  const int64_t b = lane.bqh / (g.heads * g.queries);
  const scalar_t* value_bh = value + b * g.stride_b + h * g.stride_h + lane.channel * VEC;
  const Sink grad_value = grad_value_sink.ready();
  const int64_t grad_bh = (b * g.rows * g.heads + h) * g.channels;
  const int64_t grad_stride_s = g.heads * g.channels;
  LaneGradient<acc_t, VEC> grad_out;
  {
    const scalar_t* row = grad_output + lane.bqh * g.channels;
    const auto go = *reinterpret_cast<const Vec<scalar_t, VEC>*>(row + lane.channel * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      grad_out.blocked[j] = active ? static_cast<acc_t>(go.v[j]) : acc_t(0);
      grad_out.spread[j] = active ? static_cast<acc_t>(row[j * g.lanes + lane.channel]) : acc_t(0);
    }
    grad_out.channel = lane.channel;
    grad_out.lanes = g.lanes;
  }
  const int lanes = static_cast<int>(g.lanes);
  const bool first_lane = lane.channel == 0;
  // With shuffles, every point lane runs as many rounds as the first, which has the most points.
  const int32_t rounds = rounds_of(kShuffle ? 0 : lane.point, kPointLanes, g.points);
  constexpr bool kLastLevelFirst = false;  // PointWalk
  points.template visit<kLastLevelFirst>(lane.bqh, levels, lane.point, kPointLanes, rounds,
                                         [&](const LevelGeometry& level, int32_t p, acc_t w, acc_t loc_x, acc_t loc_y) {
    const bool real = active && p < g.points;
    const int32_t height = level.height, width = level.width;
    const scalar_t* rows = value_bh + level.start * g.stride_s;
    const int64_t grad_rows = grad_bh + level.start * grad_stride_s;
    const int64_t point = lane.bqh * g.points + p;
    acc_t grad_w = 0, grad_x = 0, grad_y = 0;
    if constexpr (kDiscrete) {
      const int32_t offset = discrete_offset(loc_x, loc_y, height, width);
      if (real && offset >= 0) {
        const auto v = load_row<scalar_t, VEC>(rows, offset, g.stride_s, true);
#pragma unroll
        for (int j = 0; j < VEC; ++j) grad_w += grad_out.blocked[j] * static_cast<acc_t>(v.v[j]);
        grad_value.add_row(grad_rows + offset * grad_stride_s, w, grad_out);
      }
    } else {
      const auto corners = bilinear_corners(loc_x, loc_y, height, width);
      Vec<scalar_t, VEC> v[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        v[k] = load_row<scalar_t, VEC>(rows, corners.offset[k], g.stride_s, real && corners.inside[k]);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        acc_t dot = 0;
#pragma unroll
        for (int j = 0; j < VEC; ++j) dot += grad_out.blocked[j] * static_cast<acc_t>(v[k].v[j]);
        grad_w += corners.weight[k] * dot;
        grad_x += corners.dweight_dx[k] * dot;
        grad_y += corners.dweight_dy[k] * dot;
        if (real && corners.inside[k]) {
          grad_value.add_row(grad_rows + corners.offset[k] * grad_stride_s, w * corners.weight[k], grad_out);
        }
      }
      // Chain rule through x = loc_x * W - 0.5 and y = loc_y * H - 0.5.
      grad_x *= w * width;
      grad_y *= w * height;
    }
    add_group_partial<kShuffle>(grad_weights + point, grad_w, lanes, first_lane, real);
    add_group_partial<kShuffle>(grad_locations + 2 * point, grad_x, lanes, first_lane, real);
    add_group_partial<kShuffle>(grad_locations + 2 * point + 1, grad_y, lanes, first_lane, real);
  });
}

// The fused op's backward, after backward_kernel has left the gradients of the (computed) weights and
// locations in grad_weights and grad_locations: one thread per (batch, query, head) applies the softmax and
// location chain rules (fused_prologue.h).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock, kMinBlocksPerSM)
    fused_backpropagate_kernel(const FusedPoints<scalar_t> points, LevelParams levels,
                               const acc_type<scalar_t>* __restrict__ grad_weights,
                               const acc_type<scalar_t>* __restrict__ grad_locations,
                               scalar_t* __restrict__ grad_logits, scalar_t* __restrict__ grad_offsets,
                               acc_type<scalar_t>* __restrict__ grad_reference, int64_t total_bqh) {
  const int64_t bqh = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bqh >= total_bqh) return;
  points.prologue(levels).backpropagate(bqh, grad_weights + bqh * points.points,
                                        grad_locations ? grad_locations + 2 * bqh * points.points : nullptr,
                                        grad_logits, grad_offsets,
                                        grad_reference + bqh * points.reference_rows * points.reference_size);
}

// ------------------------------------------------------------------------------------------------ launch policy
// Host code deciding a launch from sizes alone, shared by the torch launcher (ms_deform_attn_cuda.cu) and the
// simulation harness (bench/gpusim/), so that the harness runs what the op launches.

inline int64_t blocks_for(int64_t threads, int64_t block = kThreadsPerBlock) { return (threads + block - 1) / block; }

// Threads per block of the sampling kernels: kThreadsPerBlock, halved (to 64 at the least) while the launch
// would have fewer than eight blocks per SM, so that a small launch spreads evenly over the SMs (simulated on
// the RTX 3070 model: 150 blocks of 256 over 46 SMs, some holding four and some three, took 35k cycles, 600
// blocks of 64 30k). Always a multiple of the warp, which the point lanes' shuffles need.
inline int threads_per_block(int64_t lanes, int multiprocessors) {
  int block = kThreadsPerBlock;
  while (block > 64 && blocks_for(lanes, block) < 8 * static_cast<int64_t>(multiprocessors)) block /= 2;
  return block;
}

// Channels per lane: 16 bytes' worth when the channel count, value's strides (in elements) and the pointers
// allow it, else 1.
template <typename scalar_t>
int vector_width(int64_t channels, std::initializer_list<int64_t> strides, std::initializer_list<const void*> pointers) {
  constexpr int kWide = 16 / sizeof(scalar_t);
  bool aligned = channels % kWide == 0;
  for (const int64_t stride : strides) aligned = aligned && stride % kWide == 0;
  for (const void* pointer : pointers) aligned = aligned && reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
  return aligned ? kWide : 1;
}

inline Geometry make_geometry(int64_t queries, int64_t heads, int64_t channels, int64_t points, int vec, int64_t rows,
                              int64_t stride_b, int64_t stride_s, int64_t stride_h) {
  return {queries, heads, channels, points, channels / vec, rows, stride_b, stride_s, stride_h};
}

// Whether the backward reduces a (batch, query, head)'s gradients over its lanes with warp shuffles: when its
// lane group is a power of two up to 32, so that groups tile warps.
inline bool shuffles_within_groups(const Geometry& g) { return g.lanes <= 32 && (g.lanes & (g.lanes - 1)) == 0; }

constexpr int kMaxPointLanes = 8;
constexpr int kMaxForwardPointLanes = 4;

// Point lanes per (batch, query, head), on the vectorized path when its channel lanes are a power of two
// (groups then tile warps and combine with shuffles; else 1; the scalar path, for odd channel counts and
// strides, keeps one to halve the kernels compiled): as many as fit in a warp beside the channel lanes, up to
// its point count and kMaxPointLanes, for the backward; the forward takes at most four where value fits in
// the L2 and two where it does not. As GPGPU-Sim measured them at RT-DETRv2's decoder shape, B=1
// (bench/results/gpusim-2026-12-06/): the backward gains on every config from as many as fit; the forward
// gains from four where value stays in the L2, but loses to two or one where it does not, as more scattered
// row fetches in flight contend for DRAM. Eight lost too, at LW-DETR large's decoder (16-channel heads, 8
// points; SM90_H100 model): 19.1k cycles against 13.5k for four or two (bench/results/gpusim-family-2026-12-06/).
inline int point_lanes(const Geometry& g, bool vectorized, bool forward, bool value_fits_l2) {
  if (!vectorized || !shuffles_within_groups(g)) return 1;
  const int limit = forward ? (value_fits_l2 ? kMaxForwardPointLanes : 2) : kMaxPointLanes;
  int lanes = 1;
  while (lanes < limit && 2 * lanes * g.lanes <= 32 && 2 * lanes <= g.points) lanes *= 2;
  return lanes;
}

// Calls f(std::integral_constant<int, lanes>()) for the runtime number of point lanes (1, 2, 4 or, where kMax
// allows, 8): only the counts point_lanes() can choose are compiled.
template <int kMax, typename F>
void dispatch_point_lanes(int lanes, const F& f) {
  switch (lanes) {
    case 8:
      if constexpr (kMax >= 8) {
        f(std::integral_constant<int, 8>());
        break;
      }
      [[fallthrough]];
    case 4: f(std::integral_constant<int, 4>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    default: f(std::integral_constant<int, 1>()); break;
  }
}

}  // namespace rtdetrv2_kernels
