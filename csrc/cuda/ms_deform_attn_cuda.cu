// CUDA kernels for multi-scale deformable attention, forward and backward, both sampling methods.
//
// A (batch, query, head) is served by a group of adjacent lanes, each owning VEC consecutive channels
// (16 bytes: 4 fp32 or 8 fp16/bf16 channels; VEC = 1 when C or the strides do not allow it). The lanes of a
// group read the same location and weight, which the cache serves once; each lane gathers its channels of
// the four corners with one vector load apiece, all four issued before use. The backward scatters into
// grad_value with atomics on an fp32 (fp64 for fp64) buffer, four floats per atomic on sm_90, and reduces
// the location and weight gradients over the group's lanes with warp shuffles when the group size is a power
// of two up to 32 (atomics otherwise). Under torch.use_deterministic_algorithms(True) grad_value accumulates
// in 64-bit fixed point instead, whose integer additions give the same bits in any order (FixedPointSink).
// Level shapes travel in the kernel arguments (LevelParams), so no launch needs a device table or a sync; the
// tensor form of the op reads them from device memory instead (DeviceLevels), which needs no sync either.
#include "cuda_runtime.h"  // first: in the emulated build it defines __CUDA_ARCH__ for what follows

#include <cfloat>
#include <tuple>
#include <type_traits>

#include "../fused_prologue.h"
#include "../ms_deform_attn.h"
#include "../sampling.h"

namespace rtdetrv2_kernels {
namespace {

constexpr int kMaxLevels = 16;
constexpr int kThreadsPerBlock = 256;

int64_t blocks_for(int64_t threads) { return (threads + kThreadsPerBlock - 1) / kThreadsPerBlock; }

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

void check_level_count(const LevelTable& table) {
  TORCH_CHECK(table.num_levels() <= kMaxLevels, "rtdetrv2_kernels: the CUDA kernels support up to ", kMaxLevels,
              " levels, got ", table.num_levels());
}

LevelParams make_level_params(const LevelTable& table) {
  check_level_count(table);
  LevelParams params{};
  params.num_levels = static_cast<int32_t>(table.num_levels());
  for (int64_t l = 0; l < table.num_levels(); ++l) {
    params.height[l] = table.height[l];
    params.width[l] = table.width[l];
    params.points[l] = static_cast<int32_t>(table.points[l]);
    params.start[l] = table.start[l];
  }
  return params;
}

// table holds the point counts only (points_only_level_table); the tensors are checked for shape, dtype and
// device, and made contiguous by the caller, who keeps them alive for the launch.
DeviceLevels make_device_levels(const LevelTable& table, const at::Tensor& shapes, const at::Tensor& starts,
                                int64_t rows) {
  check_level_count(table);
  DeviceLevels levels{};
  levels.num_levels = static_cast<int32_t>(table.num_levels());
  for (int64_t l = 0; l < table.num_levels(); ++l) levels.points[l] = static_cast<int32_t>(table.points[l]);
  levels.shapes = shapes.const_data_ptr<int64_t>();
  levels.starts = starts.const_data_ptr<int64_t>();
  levels.rows = rows;
  return levels;
}

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
  using acc_t = at::opmath_type<scalar_t>;
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
  using acc_t = at::opmath_type<scalar_t>;
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
  using acc_t = at::opmath_type<scalar_t>;
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

// The deterministic mode's grad_value: allocates the zeroed 64-bit sums and chooses the scale on the device from
// `bound` (a device scalar bounding every element's total), hands the backward kernel a FixedPointSink, then
// turns the sums into grad_value. Nothing reads the device on the host.
class FixedPointAccumulator {
 public:
  FixedPointAccumulator(const at::Tensor& value, const at::Tensor& bound, gpu::Stream stream)
      : sums_(at::zeros(value.sizes(), value.options().dtype(at::kLong))),
        non_finite_(at::zeros({}, sums_.options())),
        scale_(at::empty({}, bound.options())) {
    gpu::launch<fixed_point_scale_kernel>(1, 1, stream, bound.const_data_ptr<double>(),
                                          scale_.mutable_data_ptr<double>());
  }

  FixedPointSink sink() {
    return {reinterpret_cast<unsigned long long*>(sums_.mutable_data_ptr<int64_t>()), scale_.const_data_ptr<double>(),
            reinterpret_cast<unsigned long long*>(non_finite_.mutable_data_ptr<int64_t>()), 0.0};
  }

  // grad_value in scalar_t, contiguous (B, S, H, C), once the backward kernel has run into sink().
  template <typename scalar_t>
  at::Tensor finish(gpu::Stream stream) const {
    at::Tensor grad_value = at::empty(sums_.sizes(), sums_.options().dtype(c10::CppTypeToScalarType<scalar_t>::value));
    gpu::launch<fixed_point_to_float_kernel<scalar_t>>(
        blocks_for(sums_.numel()), kThreadsPerBlock, stream, reinterpret_cast<const long long*>(sums_.const_data_ptr<int64_t>()),
        scale_.const_data_ptr<double>(), reinterpret_cast<const unsigned long long*>(non_finite_.const_data_ptr<int64_t>()),
        grad_value.mutable_data_ptr<scalar_t>(), sums_.numel());
    return grad_value;
  }

 private:
  at::Tensor sums_, non_finite_, scale_;
};

// grad_locations and grad_weights are in acc_t and zeroed when kShuffle is false; grad_value is contiguous
// (B, S, H, C), added to through the sink. With kShuffle every lane of a warp runs the whole
// loop (inactive lanes on zeros) so that the shuffles see full warps.
template <typename scalar_t, int VEC, bool kDiscrete, bool kShuffle, typename Points, typename Levels, typename Sink>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const Points points, const Sink grad_value_sink,
                    at::opmath_type<scalar_t>* __restrict__ grad_locations,
                    at::opmath_type<scalar_t>* __restrict__ grad_weights, Geometry g, Levels levels,
                    int64_t total_lanes) {
  using acc_t = at::opmath_type<scalar_t>;
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
                               const at::opmath_type<scalar_t>* __restrict__ grad_weights,
                               const at::opmath_type<scalar_t>* __restrict__ grad_locations,
                               scalar_t* __restrict__ grad_logits, scalar_t* __restrict__ grad_offsets,
                               at::opmath_type<scalar_t>* __restrict__ grad_reference, int64_t total_bqh) {
  const int64_t bqh = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bqh >= total_bqh) return;
  points.prologue(levels).backpropagate(bqh, grad_weights + bqh * points.points,
                                        grad_locations + 2 * bqh * points.points, grad_logits, grad_offsets,
                                        grad_reference + bqh * points.reference_rows * points.reference_size);
}

// Channels per lane: 16 bytes when the channel count, value's strides and both pointers allow it, else 1.
template <typename scalar_t>
int vector_width(const at::Tensor& value, const at::Tensor& other) {
  constexpr int kWide = 16 / sizeof(scalar_t);
  const int64_t C = value.size(3);
  const bool aligned = C % kWide == 0 && value.stride(0) % kWide == 0 && value.stride(1) % kWide == 0 &&
                       value.stride(2) % kWide == 0 && reinterpret_cast<uintptr_t>(value.const_data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(other.const_data_ptr()) % 16 == 0;
  return aligned ? kWide : 1;
}

Geometry make_geometry(const KernelInputs& in, int vec) {
  const at::Tensor& value = in.value;
  return {in.locations.size(1), value.size(2), value.size(3), in.locations.size(3), value.size(3) / vec,
          value.size(1), value.stride(0), value.stride(1), value.stride(2)};
}

// Runs f.template operator()<VEC, kDiscrete>() for the runtime vector width and method.
template <int kWide, typename F>
void dispatch_width_and_method(int vec, bool discrete, const F& f) {
  auto with_method = [&](auto width_constant) {
    constexpr int VEC = decltype(width_constant)::value;
    if (discrete) {
      f.template operator()<VEC, true>();
    } else {
      f.template operator()<VEC, false>();
    }
  };
  if (vec == kWide) {
    with_method(std::integral_constant<int, kWide>{});
  } else {
    with_method(std::integral_constant<int, 1>{});
  }
}

// Output (B, Q, H*C) for any point source and level table: make_points(tag) builds the source for scalar type
// decltype(*tag).
template <typename Levels, typename MakePoints>
at::Tensor forward_cuda(const KernelInputs& in, const Levels& levels, const MakePoints& make_points) {
  at::Tensor output =
      at::empty({in.value.size(0), in.locations.size(1), in.value.size(2) * in.value.size(3)}, in.value.options());
  if (output.numel() == 0) return output;
  const gpu::Stream stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const auto points = make_points(static_cast<scalar_t*>(nullptr));
    const int vec = vector_width<scalar_t>(in.value, output);
    const Geometry g = make_geometry(in, vec);
    const int64_t total = output.numel() / vec;
    dispatch_width_and_method<16 / sizeof(scalar_t)>(vec, in.discrete, [&]<int VEC, bool kDiscrete>() {
      gpu::launch<forward_kernel<scalar_t, VEC, kDiscrete, std::decay_t<decltype(points)>, Levels>>(
          blocks_for(total), kThreadsPerBlock, stream, in.value.const_data_ptr<scalar_t>(), points,
          output.mutable_data_ptr<scalar_t>(), g, levels, total);
    });
  });
  return output;
}

// grad_value, and the gradients of the per-point weights and locations in acc_t, for any point source.
// weight_mass() returns a device scalar (double) bounding, for every (batch, head), the sum over queries and
// points of |attention weight|: with max |grad_output| it bounds every element of grad_value, which the
// deterministic mode needs to choose its fixed-point scale.
template <typename Levels, typename MakePoints, typename WeightMass>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output_in, const KernelInputs& in,
                                                             const Levels& levels, const MakePoints& make_points,
                                                             const WeightMass& weight_mass) {
  const at::Tensor grad_output = grad_output_in.contiguous();
  TORCH_CHECK(grad_output.sizes() ==
                  at::IntArrayRef({in.value.size(0), in.locations.size(1), in.value.size(2) * in.value.size(3)}),
              "rtdetrv2_kernels: grad_output must be (B, Q, H*C), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == in.value.scalar_type() && grad_output.device() == in.value.device(),
              "rtdetrv2_kernels: grad_output must match value's dtype and device");
  const auto acc_options = in.value.options().dtype(at::toOpMathType(in.value.scalar_type()));
  at::Tensor grad_value;
  at::Tensor grad_locations = at::zeros(in.locations.sizes(), acc_options);
  at::Tensor grad_weights = at::zeros(in.weights.sizes(), acc_options);
  if (grad_output.numel() == 0) {
    return {at::zeros(in.value.sizes(), in.value.options()), grad_locations, grad_weights};
  }
  const gpu::Stream stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto points = make_points(static_cast<scalar_t*>(nullptr));
    const int vec = vector_width<scalar_t>(in.value, grad_output);
    const Geometry g = make_geometry(in, vec);
    const int64_t total = grad_output.numel() / vec;
    const bool shuffle = g.lanes <= 32 && (g.lanes & (g.lanes - 1)) == 0;
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    if (deterministic && !shuffle) {
      // Raises, or warns under use_deterministic_algorithms(True, warn_only=True) and goes on with atomics.
      at::globalContext().alertNotDeterministic(
          "rtdetrv2_kernels ms_deform_attn backward (CUDA) when C / VEC is not a power of two up to 32 (VEC = the "
          "channels in 16 bytes when C and value's strides are multiples of it, else 1)");
    }
    using Points = std::decay_t<decltype(points)>;
    // Runs backward_kernel into `sink` for the runtime vector width and method. Shuffles need whole warps:
    // with kShuffle, a multiple of 32 lanes is launched.
    const auto run_into = [&]<bool kShuffle, typename Sink>(const Sink& sink) {
      dispatch_width_and_method<16 / sizeof(scalar_t)>(vec, in.discrete, [&]<int VEC, bool kDiscrete>() {
        const int64_t threads = kShuffle ? blocks_for(total) * kThreadsPerBlock : total;
        gpu::launch<backward_kernel<scalar_t, VEC, kDiscrete, kShuffle, Points, Levels, Sink>>(
            blocks_for(threads), kThreadsPerBlock, stream, grad_output.const_data_ptr<scalar_t>(),
            in.value.const_data_ptr<scalar_t>(), points, sink, grad_locations.mutable_data_ptr<acc_t>(),
            grad_weights.mutable_data_ptr<acc_t>(), g, levels, total);
      });
    };
    if (deterministic && shuffle) {
      FixedPointAccumulator accumulator(in.value, grad_output.abs().amax().to(at::kDouble) * weight_mass(), stream);
      run_into.template operator()<true>(accumulator.sink());
      grad_value = accumulator.finish<scalar_t>(stream);
    } else {
      grad_value = at::zeros(in.value.sizes(), acc_options);
      const FloatSink<acc_t> sink{grad_value.mutable_data_ptr<acc_t>()};
      if (shuffle) {
        run_into.template operator()<true>(sink);
      } else {
        run_into.template operator()<false>(sink);
      }
    }
  });
  return {grad_value.to(in.value.scalar_type()), grad_locations, grad_weights};
}

template <typename scalar_t>
PlainPoints<scalar_t> plain_points(const KernelInputs& in) {
  return {in.locations.const_data_ptr<scalar_t>(), in.weights.const_data_ptr<scalar_t>(), in.weights.size(3)};
}

template <typename Levels>
at::Tensor plain_forward_cuda(const KernelInputs& in, const Levels& levels) {
  return forward_cuda(in, levels, [&](auto* tag) { return plain_points<std::remove_pointer_t<decltype(tag)>>(in); });
}

template <typename Levels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> plain_backward_cuda(const at::Tensor& grad_output,
                                                                   const KernelInputs& in, const Levels& levels) {
  auto [grad_value, grad_locations, grad_weights] = backward_cuda(
      grad_output, in, levels, [&](auto* tag) { return plain_points<std::remove_pointer_t<decltype(tag)>>(in); },
      [&] { return in.weights.abs().to(at::kDouble).sum({1, 3}).amax(); });
  const auto dtype = in.value.scalar_type();
  return {grad_value, grad_locations.to(dtype), grad_weights.to(dtype)};
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, at::IntArrayRef spatial_shapes,
                                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                       at::IntArrayRef num_points, c10::string_view method) {
  const gpu::DeviceGuard guard(value.device());
  const KernelInputs in =
      prepare_inputs(value, spatial_shapes, sampling_locations, attention_weights, num_points, method);
  return plain_forward_cuda(in, make_level_params(in.levels));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, at::IntArrayRef spatial_shapes,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::IntArrayRef num_points,
    c10::string_view method) {
  const gpu::DeviceGuard guard(value.device());
  const KernelInputs in =
      prepare_inputs(value, spatial_shapes, sampling_locations, attention_weights, num_points, method);
  return plain_backward_cuda(grad_output, in, make_level_params(in.levels));
}

// The tensor form: the table's values are never read on the host (no sync; capturable in a CUDA graph).
struct TensorLevelInputs {
  KernelInputs in;
  at::Tensor shapes, starts;  // contiguous; alive for the launches
  DeviceLevels levels;
};

TensorLevelInputs prepare_tensor_level_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                              const at::Tensor& level_start_index,
                                              const at::Tensor& sampling_locations,
                                              const at::Tensor& attention_weights, at::IntArrayRef num_points,
                                              c10::string_view method) {
  check_level_tensors(value, spatial_shapes, level_start_index, num_points);
  KernelInputs in = prepare_inputs(points_only_level_table(num_points), value, sampling_locations,
                                   attention_weights, method);
  at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const DeviceLevels levels = make_device_levels(in.levels, shapes, starts, in.value.size(1));
  return {std::move(in), std::move(shapes), std::move(starts), levels};
}

at::Tensor ms_deform_attn_forward_tensor_levels_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights, at::IntArrayRef num_points,
                                                     c10::string_view method) {
  const gpu::DeviceGuard guard(value.device());
  const TensorLevelInputs inputs = prepare_tensor_level_inputs(value, spatial_shapes, level_start_index,
                                                               sampling_locations, attention_weights, num_points, method);
  return plain_forward_cuda(inputs.in, inputs.levels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_tensor_levels_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    at::IntArrayRef num_points, c10::string_view method) {
  const gpu::DeviceGuard guard(value.device());
  const TensorLevelInputs inputs = prepare_tensor_level_inputs(value, spatial_shapes, level_start_index,
                                                               sampling_locations, attention_weights, num_points, method);
  return plain_backward_cuda(grad_output, inputs.in, inputs.levels);
}

template <typename scalar_t>
FusedPoints<scalar_t> fused_points(const KernelInputs& in, const at::Tensor& reference, double offset_scale) {
  return {reference.const_data_ptr<scalar_t>(), in.locations.const_data_ptr<scalar_t>(),
          in.weights.const_data_ptr<scalar_t>(), in.value.size(2), in.weights.size(3), reference.size(2),
          reference.size(3), static_cast<at::opmath_type<scalar_t>>(offset_scale)};
}

at::Tensor ms_deform_attn_fused_forward_cuda(const at::Tensor& value, at::IntArrayRef spatial_shapes,
                                             const at::Tensor& reference_points, const at::Tensor& sampling_offsets,
                                             const at::Tensor& attention_logits, at::IntArrayRef num_points,
                                             double offset_scale, c10::string_view method) {
  const gpu::DeviceGuard guard(value.device());
  const KernelInputs in = prepare_fused_inputs(value, spatial_shapes, reference_points, sampling_offsets,
                                               attention_logits, num_points, method);
  const at::Tensor reference = reference_points.contiguous();
  return forward_cuda(in, make_level_params(in.levels), [&](auto* tag) {
    return fused_points<std::remove_pointer_t<decltype(tag)>>(in, reference, offset_scale);
  });
}

// Returns the gradients of value, reference_points, sampling_offsets and attention_logits: backward_kernel
// with the computed weights and locations, then fused_backpropagate_kernel through the prologue.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_fused_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, at::IntArrayRef spatial_shapes,
    const at::Tensor& reference_points, const at::Tensor& sampling_offsets, const at::Tensor& attention_logits,
    at::IntArrayRef num_points, double offset_scale, c10::string_view method) {
  const gpu::DeviceGuard guard(value.device());
  const KernelInputs in = prepare_fused_inputs(value, spatial_shapes, reference_points, sampling_offsets,
                                               attention_logits, num_points, method);
  const at::Tensor reference = reference_points.contiguous();
  // The softmaxed weights of each (batch, query, head) sum to 1 (to rounding, which the 2^62 bound absorbs).
  const LevelParams levels = make_level_params(in.levels);
  auto [grad_value, grad_locations, grad_weights] = backward_cuda(
      grad_output, in, levels,
      [&](auto* tag) { return fused_points<std::remove_pointer_t<decltype(tag)>>(in, reference, offset_scale); },
      [&] { return at::scalar_tensor(static_cast<double>(in.locations.size(1)), in.value.options().dtype(at::kDouble)); });
  const int64_t B = in.value.size(0), Q = in.locations.size(1), H = in.value.size(2);
  // Each head's share of the reference gradient, summed over heads below.
  at::Tensor grad_reference_per_head =
      at::empty({B, Q, H, reference.size(2), reference.size(3)}, grad_weights.options());
  at::Tensor grad_offsets = at::empty_like(in.locations);
  at::Tensor grad_logits = at::empty_like(in.weights);
  const int64_t total_bqh = B * Q * H;
  if (total_bqh > 0) {
    const gpu::Stream stream = gpu::current_stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_fused_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      gpu::launch<fused_backpropagate_kernel<scalar_t>>(
          blocks_for(total_bqh), kThreadsPerBlock, stream, fused_points<scalar_t>(in, reference, offset_scale), levels,
          grad_weights.const_data_ptr<acc_t>(), grad_locations.const_data_ptr<acc_t>(),
          grad_logits.mutable_data_ptr<scalar_t>(), grad_offsets.mutable_data_ptr<scalar_t>(),
          grad_reference_per_head.mutable_data_ptr<acc_t>(), total_bqh);
    });
  }
  return {grad_value, grad_reference_per_head.sum(2).to(reference.scalar_type()), grad_offsets, grad_logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(RTDETRV2_CUDA_OPS, RTDETRV2_CUDA_DISPATCH_KEY, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
  m.impl("ms_deform_attn_forward_tensor_levels", &ms_deform_attn_forward_tensor_levels_cuda);
  m.impl("ms_deform_attn_backward_tensor_levels", &ms_deform_attn_backward_tensor_levels_cuda);
  m.impl("ms_deform_attn_fused_forward", &ms_deform_attn_fused_forward_cuda);
  m.impl("ms_deform_attn_fused_backward", &ms_deform_attn_fused_backward_cuda);
}

}  // namespace rtdetrv2_kernels
