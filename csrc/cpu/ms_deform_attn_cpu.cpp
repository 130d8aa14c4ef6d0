// C++ CPU kernels for multi-scale deformable attention, forward and backward, both sampling methods.
//
// Forward is parallel over (batch, query, head): every output row is written by exactly one task.
// Backward is parallel over (batch, head): the rows of grad_value that one (batch, head) pair can touch are
// disjoint from every other pair's, so the scatter needs no atomics and no per-thread copies of grad_value,
// and the result is bitwise reproducible for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../ms_deform_attn.h"
#include "../sampling.h"

namespace rtdetrv2_kernels {
namespace {

// The hot loops are compiled twice on x86-64 Linux with GCC, for the baseline ISA and for x86-64-v3
// (AVX2 + FMA), and the loader picks the best one for the running CPU. Other platforms get one build.
// Helpers they call are forced inline so that they are compiled into each version.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define RTDETRV2_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RTDETRV2_CPU_MULTIVERSION
#endif
#if defined(__GNUC__)
#define RTDETRV2_INLINE inline __attribute__((always_inline))
#else
#define RTDETRV2_INLINE inline
#endif

// Calls f(level, point) for every sampling point, levels in order, so point indexes the P dimension.
template <typename F>
RTDETRV2_INLINE void for_each_point(const LevelTable& levels, const F& f) {
  int64_t point = 0;
  for (int64_t level = 0; level < levels.num_levels(); ++level) {
    for (int64_t i = 0; i < levels.points[level]; ++i, ++point) f(level, point);
  }
}

// Explicit SIMD through the GCC/Clang vector extension: 32-byte bundles of acc_t that compile to SSE2 or
// AVX on x86-64 and to NEON on ARM without intrinsics.
template <typename acc_t>
struct Simd {
  typedef acc_t Vec __attribute__((vector_size(32)));
  static constexpr int64_t kLanes = 32 / sizeof(acc_t);

  template <typename scalar_t>
  RTDETRV2_INLINE static Vec load(const scalar_t* p) {
    Vec v;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::memcpy(&v, p, sizeof(Vec));
    } else {
      for (int64_t i = 0; i < kLanes; ++i) v[i] = static_cast<acc_t>(p[i]);
    }
    return v;
  }
  template <typename scalar_t>
  RTDETRV2_INLINE static void store(scalar_t* p, const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::memcpy(p, &v, sizeof(Vec));
    } else {
      for (int64_t i = 0; i < kLanes; ++i) p[i] = static_cast<scalar_t>(v[i]);
    }
  }
  RTDETRV2_INLINE static acc_t sum(const Vec& v) {
    acc_t total = 0;
    for (int64_t i = 0; i < kLanes; ++i) total += v[i];
    return total;
  }
};

RTDETRV2_INLINE void prefetch(const void* address) {
#if defined(__GNUC__)
  __builtin_prefetch(address);
#endif
}

// Everything a kernel reads or writes, with value's strides in elements: row (b, s, h) of C contiguous
// channels starts at value + b*batch_stride + s*row_stride + h*head_stride.
template <typename scalar_t>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  const LevelTable& levels;
  int64_t batch, rows, queries, heads, channels, points;
  int64_t batch_stride, row_stride, head_stride;
  const scalar_t* value;
  const scalar_t* locations;  // contiguous (B, Q, H, P, 2)
  const scalar_t* weights;    // contiguous (B, Q, H, P)

  Problem(const LevelTable& table, const at::Tensor& value_t, const at::Tensor& locations_t, const at::Tensor& weights_t)
      : levels(table),
        batch(value_t.size(0)), rows(value_t.size(1)), queries(locations_t.size(1)), heads(value_t.size(2)),
        channels(value_t.size(3)), points(locations_t.size(3)),
        batch_stride(value_t.stride(0)), row_stride(value_t.stride(1)), head_stride(value_t.stride(2)),
        value(value_t.const_data_ptr<scalar_t>()), locations(locations_t.const_data_ptr<scalar_t>()),
        weights(weights_t.const_data_ptr<scalar_t>()) {}

  // Calls f(level, point, weight, loc_x, loc_y, level_rows) for every point of (batch, query, head) bqh.
  template <typename F>
  RTDETRV2_INLINE void visit_points(int64_t bqh, const F& f) const {
    const int64_t b = bqh / (queries * heads), h = bqh % heads;
    const scalar_t* value_bh = value + b * batch_stride + h * head_stride;
    const int64_t first = bqh * points;
    for_each_point(levels, [&](int64_t l, int64_t p) {
      f(l, p, static_cast<acc_t>(weights[first + p]), static_cast<acc_t>(locations[2 * (first + p)]),
        static_cast<acc_t>(locations[2 * (first + p) + 1]), value_bh + levels.start[l] * row_stride);
    });
  }
};

// The rows one sampling point reads (4 for bilinear, 1 for discrete).
template <bool kDiscrete>
constexpr int64_t kTapsPerPoint = kDiscrete ? 1 : 4;

// out[c] = sum over taps t of weights[t] * rows[t][c]. Channels go in groups of up to kGroup vectors with
// one accumulator each: independent FMA chains hide the FMA latency that a single chain would serialize on.
template <typename scalar_t, typename acc_t>
RTDETRV2_INLINE void weighted_sum(const scalar_t* const* rows, const acc_t* weights, int64_t num_taps, int64_t C,
                         scalar_t* out) {
  using S = Simd<acc_t>;
  constexpr int64_t kGroup = 4;
  int64_t c = 0;
  auto sum_vectors = [&](auto group_constant) {
    constexpr int64_t kVectors = decltype(group_constant)::value;
    for (; c + kVectors * S::kLanes <= C; c += kVectors * S::kLanes) {
      typename S::Vec acc[kVectors] = {};
      for (int64_t t = 0; t < num_taps; ++t) {
        const scalar_t* row = rows[t] + c;
        for (int64_t j = 0; j < kVectors; ++j) acc[j] += weights[t] * S::load(row + j * S::kLanes);
      }
      for (int64_t j = 0; j < kVectors; ++j) S::store(out + c + j * S::kLanes, acc[j]);
    }
  };
  sum_vectors(std::integral_constant<int64_t, kGroup>{});
  sum_vectors(std::integral_constant<int64_t, 1>{});
  for (; c < C; ++c) {
    acc_t acc = 0;
    for (int64_t t = 0; t < num_taps; ++t) acc += weights[t] * static_cast<acc_t>(rows[t][c]);
    out[c] = static_cast<scalar_t>(acc);
  }
}

// output[bqh] for bqh in [begin, end): each (batch, query, head) first lists the rows its points read with
// their weights (times the attention weight), then sums them channel block by channel block.
template <typename scalar_t, bool kDiscrete>
RTDETRV2_CPU_MULTIVERSION void forward_range(const Problem<scalar_t>& problem, int64_t begin, int64_t end,
                                             scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = problem.channels;
  const int64_t num_taps = problem.points * kTapsPerPoint<kDiscrete>;
  std::vector<const scalar_t*> tap_rows(num_taps);
  std::vector<acc_t> tap_weights(num_taps);
  // Taps outside the level read this row, so the summation has no branches.
  const std::vector<scalar_t> zero_row(C, scalar_t(0));
  for (int64_t bqh = begin; bqh < end; ++bqh) {
    problem.visit_points(bqh, [&](int64_t l, int64_t p, acc_t w, acc_t loc_x, acc_t loc_y, const scalar_t* level_rows) {
      const int32_t height = problem.levels.height[l], width = problem.levels.width[l];
      const scalar_t** rows = &tap_rows[p * kTapsPerPoint<kDiscrete>];
      acc_t* weights = &tap_weights[p * kTapsPerPoint<kDiscrete>];
      if constexpr (kDiscrete) {
        const int32_t offset = discrete_offset(loc_x, loc_y, height, width);
        rows[0] = offset >= 0 ? level_rows + offset * problem.row_stride : zero_row.data();
        weights[0] = w;
      } else {
        const auto corners = bilinear_corners(loc_x, loc_y, height, width);
        for (int k = 0; k < 4; ++k) {
          rows[k] = corners.inside[k] ? level_rows + corners.offset[k] * problem.row_stride : zero_row.data();
          weights[k] = w * corners.weight[k];
        }
      }
      if constexpr (kDiscrete) {
        // One row per point leaves the summation little to overlap its cache misses with; measured, the
        // prefetch halves the discrete forward, while the four-corner bilinear sum runs best without it.
        for (int64_t c = 0; c < C; c += 64 / sizeof(scalar_t)) prefetch(rows[0] + c);
      }
    });
    weighted_sum(tap_rows.data(), tap_weights.data(), num_taps, C, output + bqh * C);
  }
}

// Returns grad_out . row and adds scale * grad_out to grad_row.
template <typename scalar_t, typename acc_t>
RTDETRV2_INLINE acc_t dot_and_scatter(const acc_t* grad_out, const scalar_t* row, acc_t* grad_row, acc_t scale, int64_t C) {
  using S = Simd<acc_t>;
  typename S::Vec dot = {};
  int64_t c = 0;
  for (; c + S::kLanes <= C; c += S::kLanes) {
    const typename S::Vec g = S::load(grad_out + c);
    dot += g * S::load(row + c);
    S::store(grad_row + c, S::load(grad_row + c) + scale * g);
  }
  acc_t total = S::sum(dot);
  for (; c < C; ++c) {
    total += grad_out[c] * static_cast<acc_t>(row[c]);
    grad_row[c] += scale * grad_out[c];
  }
  return total;
}

// Gradients for the (batch, head) pairs in [begin, end). grad_value is contiguous (B, S, H, C) in acc_t
// (fp32 for half inputs); the pairs' rows in it are disjoint, so no two tasks ever write the same element.
template <typename scalar_t, bool kDiscrete>
RTDETRV2_CPU_MULTIVERSION void backward_range(const Problem<scalar_t>& problem, const scalar_t* grad_output,
                                              int64_t begin, int64_t end,
                                              at::opmath_type<scalar_t>* grad_value, scalar_t* grad_locations,
                                              scalar_t* grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = problem.channels, H = problem.heads, Q = problem.queries;
  const int64_t grad_row_stride = H * C;
  std::vector<acc_t> grad_out(C);
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    acc_t* grad_value_bh = grad_value + (b * problem.rows * H + h) * C;
    for (int64_t q = 0; q < Q; ++q) {
      const int64_t bqh = (b * Q + q) * H + h;
      for (int64_t c = 0; c < C; ++c) grad_out[c] = static_cast<acc_t>(grad_output[bqh * C + c]);
      problem.visit_points(bqh, [&](int64_t l, int64_t p, acc_t w, acc_t loc_x, acc_t loc_y, const scalar_t* level_rows) {
        const int64_t point = bqh * problem.points + p;
        const int32_t height = problem.levels.height[l], width = problem.levels.width[l];
        acc_t* grad_level_rows = grad_value_bh + problem.levels.start[l] * grad_row_stride;
        if constexpr (kDiscrete) {
          const int32_t offset = discrete_offset(loc_x, loc_y, height, width);
          const acc_t sampled_dot =
              offset < 0 ? acc_t(0)
                         : dot_and_scatter(grad_out.data(), level_rows + offset * problem.row_stride,
                                           grad_level_rows + offset * grad_row_stride, w, C);
          grad_weights[point] = static_cast<scalar_t>(sampled_dot);
          grad_locations[2 * point] = scalar_t(0);
          grad_locations[2 * point + 1] = scalar_t(0);
        } else {
          const auto corners = bilinear_corners(loc_x, loc_y, height, width);
          acc_t grad_w = 0, grad_x = 0, grad_y = 0;
          for (int k = 0; k < 4; ++k) {
            if (!corners.inside[k]) continue;
            const acc_t corner_dot =
                dot_and_scatter(grad_out.data(), level_rows + corners.offset[k] * problem.row_stride,
                                grad_level_rows + corners.offset[k] * grad_row_stride, w * corners.weight[k], C);
            grad_w += corners.weight[k] * corner_dot;
            grad_x += corners.dweight_dx[k] * corner_dot;
            grad_y += corners.dweight_dy[k] * corner_dot;
          }
          grad_weights[point] = static_cast<scalar_t>(grad_w);
          // Chain rule through x = loc_x * W - 0.5 and y = loc_y * H - 0.5.
          grad_locations[2 * point] = static_cast<scalar_t>(w * grad_x * width);
          grad_locations[2 * point + 1] = static_cast<scalar_t>(w * grad_y * height);
        }
      });
    }
  }
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, at::IntArrayRef spatial_shapes,
                                      const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                      at::IntArrayRef num_points, c10::string_view method) {
  const KernelInputs in =
      prepare_inputs(value, spatial_shapes, sampling_locations, attention_weights, num_points, method);
  at::Tensor output =
      at::empty({in.value.size(0), in.locations.size(1), in.value.size(2) * in.value.size(3)}, in.value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const Problem<scalar_t> problem(in.levels, in.value, in.locations, in.weights);
    scalar_t* output_data = output.mutable_data_ptr<scalar_t>();
    const int64_t work_per_head = std::max<int64_t>(1, problem.points * problem.channels * (in.discrete ? 1 : 4));
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / work_per_head);
    at::parallel_for(0, problem.batch * problem.queries * problem.heads, grain, [&](int64_t begin, int64_t end) {
      if (in.discrete) {
        forward_range<scalar_t, true>(problem, begin, end, output_data);
      } else {
        forward_range<scalar_t, false>(problem, begin, end, output_data);
      }
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output_in, const at::Tensor& value, at::IntArrayRef spatial_shapes,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::IntArrayRef num_points,
    c10::string_view method) {
  const KernelInputs in =
      prepare_inputs(value, spatial_shapes, sampling_locations, attention_weights, num_points, method);
  const at::Tensor grad_output = grad_output_in.contiguous();
  TORCH_CHECK(grad_output.sizes() ==
                  at::IntArrayRef({in.value.size(0), in.locations.size(1), in.value.size(2) * in.value.size(3)}),
              "rtdetrv2_kernels: grad_output must be (B, Q, H*C), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == in.value.scalar_type(), "rtdetrv2_kernels: grad_output must have dtype ",
              in.value.scalar_type(), ", got ", grad_output.scalar_type());
  const auto acc_type = at::toOpMathType(in.value.scalar_type());
  at::Tensor grad_value = at::zeros(in.value.sizes(), in.value.options().dtype(acc_type));
  at::Tensor grad_locations = at::empty_like(in.locations);
  at::Tensor grad_weights = at::empty_like(in.weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const Problem<scalar_t> problem(in.levels, in.value, in.locations, in.weights);
    const scalar_t* grad_output_data = grad_output.const_data_ptr<scalar_t>();
    auto* grad_value_data = grad_value.mutable_data_ptr<at::opmath_type<scalar_t>>();
    scalar_t* grad_location_data = grad_locations.mutable_data_ptr<scalar_t>();
    scalar_t* grad_weight_data = grad_weights.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, problem.batch * problem.heads, 1, [&](int64_t begin, int64_t end) {
      if (in.discrete) {
        backward_range<scalar_t, true>(problem, grad_output_data, begin, end, grad_value_data, grad_location_data,
                                       grad_weight_data);
      } else {
        backward_range<scalar_t, false>(problem, grad_output_data, begin, end, grad_value_data, grad_location_data,
                                        grad_weight_data);
      }
    });
  });
  return {grad_value.to(in.value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(rtdetrv2_kernels, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace rtdetrv2_kernels
