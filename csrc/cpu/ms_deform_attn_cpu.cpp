// C++ CPU kernels for multi-scale deformable attention, forward and backward, both sampling methods.
//
// Forward is parallel over (batch, query): every output row is written by exactly one task.
// Backward is parallel over (batch, head): the rows of grad_value that one (batch, head) pair can touch are
// disjoint from every other pair's, so the scatter needs no atomics and no per-thread copies of grad_value,
// and the result is bitwise reproducible for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../ms_deform_attn.h"
#include "../sampling.h"

namespace rtdetrv2_kernels {
namespace {

// Calls f(level, point) for every sampling point, levels in order, so point indexes the P dimension.
template <typename F>
inline void for_each_point(const LevelTable& levels, const F& f) {
  int64_t point = 0;
  for (int64_t level = 0; level < levels.num_levels(); ++level) {
    for (int64_t i = 0; i < levels.points[level]; ++i, ++point) f(level, point);
  }
}

// Strides of value in rows: the kernels read C contiguous channels at value + b*batch + s*row + h*head.
struct ValueLayout {
  int64_t batch, row, head;
  explicit ValueLayout(const at::Tensor& value) : batch(value.stride(0)), row(value.stride(1)), head(value.stride(2)) {}
};

template <typename scalar_t, bool kDiscrete>
void forward_kernel(const at::Tensor& value, const LevelTable& levels, const at::Tensor& locations,
                    const at::Tensor& weights, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = locations.size(1), H = value.size(2), C = value.size(3), P = locations.size(3);
  const ValueLayout layout(value);
  const scalar_t* value_data = value.const_data_ptr<scalar_t>();
  const scalar_t* location_data = locations.const_data_ptr<scalar_t>();
  const scalar_t* weight_data = weights.const_data_ptr<scalar_t>();
  scalar_t* output_data = output.mutable_data_ptr<scalar_t>();
  const int64_t work_per_query = std::max<int64_t>(1, H * P * C * (kDiscrete ? 1 : 4));
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / work_per_query);

  at::parallel_for(0, value.size(0) * Q, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    // Corners outside the level read this row, so the inner loop has no branches.
    const std::vector<scalar_t> zero_row(C, scalar_t(0));
    for (int64_t bq = begin; bq < end; ++bq) {
      const scalar_t* value_b = value_data + (bq / Q) * layout.batch;
      for (int64_t h = 0; h < H; ++h) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int64_t first_point = (bq * H + h) * P;
        const scalar_t* value_bh = value_b + h * layout.head;
        for_each_point(levels, [&](int64_t l, int64_t p) {
          const acc_t w = weight_data[first_point + p];
          const acc_t loc_x = location_data[2 * (first_point + p)];
          const acc_t loc_y = location_data[2 * (first_point + p) + 1];
          const scalar_t* level_rows = value_bh + levels.start[l] * layout.row;
          if constexpr (kDiscrete) {
            const int32_t offset = discrete_offset(loc_x, loc_y, levels.height[l], levels.width[l]);
            const scalar_t* row = offset >= 0 ? level_rows + offset * layout.row : zero_row.data();
            for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<acc_t>(row[c]);
          } else {
            const auto corners = bilinear_corners(loc_x, loc_y, levels.height[l], levels.width[l]);
            const scalar_t* rows[4];
            for (int k = 0; k < 4; ++k) {
              rows[k] = corners.inside[k] ? level_rows + corners.offset[k] * layout.row : zero_row.data();
            }
            const auto& cw = corners.weight;
            for (int64_t c = 0; c < C; ++c) {
              acc[c] += w * (cw[0] * static_cast<acc_t>(rows[0][c]) + cw[1] * static_cast<acc_t>(rows[1][c]) +
                             cw[2] * static_cast<acc_t>(rows[2][c]) + cw[3] * static_cast<acc_t>(rows[3][c]));
            }
          }
        });
        scalar_t* out_row = output_data + (bq * H + h) * C;
        for (int64_t c = 0; c < C; ++c) out_row[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

// grad_value is accumulated in acc_t (fp32 for half inputs) in a contiguous (B, S, H, C) buffer.
template <typename scalar_t, bool kDiscrete>
void backward_kernel(const at::Tensor& grad_output, const at::Tensor& value, const LevelTable& levels,
                     const at::Tensor& locations, const at::Tensor& weights, at::Tensor& grad_value,
                     at::Tensor& grad_locations, at::Tensor& grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = value.size(1), H = value.size(2), C = value.size(3);
  const int64_t Q = locations.size(1), P = locations.size(3);
  const ValueLayout layout(value);
  const scalar_t* value_data = value.const_data_ptr<scalar_t>();
  const scalar_t* grad_output_data = grad_output.const_data_ptr<scalar_t>();
  const scalar_t* location_data = locations.const_data_ptr<scalar_t>();
  const scalar_t* weight_data = weights.const_data_ptr<scalar_t>();
  acc_t* grad_value_data = grad_value.mutable_data_ptr<acc_t>();
  scalar_t* grad_location_data = grad_locations.mutable_data_ptr<scalar_t>();
  scalar_t* grad_weight_data = grad_weights.mutable_data_ptr<scalar_t>();
  const int64_t grad_row = H * C;

  at::parallel_for(0, value.size(0) * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad_out(C);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const scalar_t* value_bh = value_data + b * layout.batch + h * layout.head;
      acc_t* grad_value_bh = grad_value_data + (b * S * H + h) * C;
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t bqh = (b * Q + q) * H + h;
        const scalar_t* grad_out_row = grad_output_data + bqh * C;
        for (int64_t c = 0; c < C; ++c) grad_out[c] = static_cast<acc_t>(grad_out_row[c]);
        const int64_t first_point = bqh * P;
        for_each_point(levels, [&](int64_t l, int64_t p) {
          const int64_t point = first_point + p;
          const acc_t w = weight_data[point];
          const acc_t loc_x = location_data[2 * point];
          const acc_t loc_y = location_data[2 * point + 1];
          const scalar_t* level_rows = value_bh + levels.start[l] * layout.row;
          acc_t* grad_level_rows = grad_value_bh + levels.start[l] * grad_row;
          if constexpr (kDiscrete) {
            const int32_t offset = discrete_offset(loc_x, loc_y, levels.height[l], levels.width[l]);
            acc_t sampled_dot = 0;  // grad_output . value[pixel]
            if (offset >= 0) {
              const scalar_t* row = level_rows + offset * layout.row;
              acc_t* grad_row_ptr = grad_level_rows + offset * grad_row;
              for (int64_t c = 0; c < C; ++c) {
                sampled_dot += grad_out[c] * static_cast<acc_t>(row[c]);
                grad_row_ptr[c] += w * grad_out[c];
              }
            }
            grad_weight_data[point] = static_cast<scalar_t>(sampled_dot);
            grad_location_data[2 * point] = scalar_t(0);
            grad_location_data[2 * point + 1] = scalar_t(0);
          } else {
            const auto corners = bilinear_corners(loc_x, loc_y, levels.height[l], levels.width[l]);
            acc_t grad_w = 0, grad_x = 0, grad_y = 0;
            for (int k = 0; k < 4; ++k) {
              if (!corners.inside[k]) continue;
              const scalar_t* row = level_rows + corners.offset[k] * layout.row;
              acc_t* grad_row_ptr = grad_level_rows + corners.offset[k] * grad_row;
              const acc_t scale = w * corners.weight[k];
              acc_t corner_dot = 0;  // grad_output . value[corner]
              for (int64_t c = 0; c < C; ++c) {
                corner_dot += grad_out[c] * static_cast<acc_t>(row[c]);
                grad_row_ptr[c] += scale * grad_out[c];
              }
              grad_w += corners.weight[k] * corner_dot;
              grad_x += corners.dweight_dx[k] * corner_dot;
              grad_y += corners.dweight_dy[k] * corner_dot;
            }
            grad_weight_data[point] = static_cast<scalar_t>(grad_w);
            // Chain rule through x = loc_x * W - 0.5 and y = loc_y * H - 0.5.
            grad_location_data[2 * point] = static_cast<scalar_t>(w * grad_x * levels.width[l]);
            grad_location_data[2 * point + 1] = static_cast<scalar_t>(w * grad_y * levels.height[l]);
          }
        });
      }
    }
  });
}

// The kernels read C contiguous channels per row and any stride elsewhere, so an expanded or sliced value
// is used in place; only a value whose channels are strided is copied.
at::Tensor with_contiguous_channels(const at::Tensor& value) {
  return value.stride(3) == 1 ? value : value.contiguous();
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value_in, at::IntArrayRef spatial_shapes,
                                      const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                      at::IntArrayRef num_points, c10::string_view method) {
  const LevelTable levels = make_level_table(spatial_shapes, num_points);
  check_inputs(value_in, levels, sampling_locations, attention_weights);
  const bool discrete = is_discrete(std::string(method));
  const at::Tensor value = with_contiguous_channels(value_in);
  const at::Tensor locations = sampling_locations.contiguous();
  const at::Tensor weights = attention_weights.contiguous();
  at::Tensor output =
      at::empty({value.size(0), locations.size(1), value.size(2) * value.size(3)}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    if (discrete) {
      forward_kernel<scalar_t, true>(value, levels, locations, weights, output);
    } else {
      forward_kernel<scalar_t, false>(value, levels, locations, weights, output);
    }
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output_in, const at::Tensor& value_in, at::IntArrayRef spatial_shapes,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, at::IntArrayRef num_points,
    c10::string_view method) {
  const LevelTable levels = make_level_table(spatial_shapes, num_points);
  check_inputs(value_in, levels, sampling_locations, attention_weights);
  const bool discrete = is_discrete(std::string(method));
  const at::Tensor value = with_contiguous_channels(value_in);
  const at::Tensor locations = sampling_locations.contiguous();
  const at::Tensor weights = attention_weights.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({value.size(0), locations.size(1), value.size(2) * value.size(3)}),
              "rtdetrv2_kernels: grad_output must be (B, Q, H*C), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), "rtdetrv2_kernels: grad_output must have dtype ",
              value.scalar_type(), ", got ", grad_output.scalar_type());
  const auto acc_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_locations = at::empty_like(locations);
  at::Tensor grad_weights = at::empty_like(weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    if (discrete) {
      backward_kernel<scalar_t, true>(grad_output, value, levels, locations, weights, grad_value, grad_locations,
                                      grad_weights);
    } else {
      backward_kernel<scalar_t, false>(grad_output, value, levels, locations, weights, grad_value, grad_locations,
                                       grad_weights);
    }
  });
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(rtdetrv2_kernels, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace rtdetrv2_kernels
