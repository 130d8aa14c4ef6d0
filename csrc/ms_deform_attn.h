#pragma once
// Host-side pieces shared by every C++ launcher (CPU and CUDA): the level table and the checks that keep
// a raw call of the op (torch.ops.rtdetrv2_kernels.*) from reading out of bounds. The Python wrapper
// validates first and gives friendlier messages; these checks are the safety net.
#include <torch/types.h>

#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace rtdetrv2_kernels {

struct LevelTable {
  std::vector<int32_t> height;
  std::vector<int32_t> width;
  std::vector<int64_t> start;   // first row of the level in value's sequence dimension
  std::vector<int64_t> points;  // sampling points per head on this level
  int64_t num_levels() const { return static_cast<int64_t>(height.size()); }
};

inline bool is_discrete(const std::string& method) {
  TORCH_CHECK(method == "default" || method == "discrete",
              "rtdetrv2_kernels: method must be \"default\" or \"discrete\", got \"", method, "\"");
  return method == "discrete";
}

// spatial_shapes is flattened (H_0, W_0, H_1, W_1, ...).
inline LevelTable make_level_table(at::IntArrayRef spatial_shapes, at::IntArrayRef num_points) {
  TORCH_CHECK(!spatial_shapes.empty() && spatial_shapes.size() % 2 == 0,
              "rtdetrv2_kernels: spatial_shapes must hold (height, width) pairs, got ", spatial_shapes.size(),
              " values");
  const size_t num_levels = spatial_shapes.size() / 2;
  TORCH_CHECK(num_points.size() == num_levels, "rtdetrv2_kernels: num_points has ", num_points.size(),
              " entries but there are ", num_levels, " levels");
  LevelTable table;
  int64_t start = 0;
  for (size_t l = 0; l < num_levels; ++l) {
    const int64_t h = spatial_shapes[2 * l];
    const int64_t w = spatial_shapes[2 * l + 1];
    TORCH_CHECK(h > 0 && w > 0 && h * w <= std::numeric_limits<int32_t>::max(),
                "rtdetrv2_kernels: level ", l, " has size ", h, "x", w,
                "; sizes must be positive with height*width < 2^31");
    TORCH_CHECK(num_points[l] > 0, "rtdetrv2_kernels: num_points[", l, "] must be positive, got ",
                num_points[l]);
    table.height.push_back(static_cast<int32_t>(h));
    table.width.push_back(static_cast<int32_t>(w));
    table.start.push_back(start);
    table.points.push_back(num_points[l]);
    start += h * w;
  }
  return table;
}

inline void check_inputs(const at::Tensor& value, const LevelTable& levels, const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "rtdetrv2_kernels: value must be (B, S, H, C), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 5 && sampling_locations.size(4) == 2,
              "rtdetrv2_kernels: sampling_locations must be (B, Q, H, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 4, "rtdetrv2_kernels: attention_weights must be (B, Q, H, P), got ",
              attention_weights.sizes());
  int64_t total_points = 0;
  for (int64_t p : levels.points) total_points += p;
  const int64_t total_rows = levels.start.back() + static_cast<int64_t>(levels.height.back()) * levels.width.back();
  TORCH_CHECK(value.size(1) == total_rows, "rtdetrv2_kernels: value has S=", value.size(1),
              " but the spatial shapes sum to ", total_rows);
  const int64_t B = value.size(0), H = value.size(2), Q = sampling_locations.size(1);
  TORCH_CHECK(sampling_locations.sizes() == at::IntArrayRef({B, Q, H, total_points, 2}),
              "rtdetrv2_kernels: sampling_locations must be (B, Q, H, P, 2) = (", B, ", Q, ", H, ", ", total_points,
              ", 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef({B, Q, H, total_points}),
              "rtdetrv2_kernels: attention_weights must be (B, Q, H, P) = (", B, ", ", Q, ", ", H, ", ",
              total_points, "), got ", attention_weights.sizes());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "rtdetrv2_kernels: value, sampling_locations and attention_weights must share one dtype");
  TORCH_CHECK(sampling_locations.device() == value.device() && attention_weights.device() == value.device(),
              "rtdetrv2_kernels: value, sampling_locations and attention_weights must be on one device");
}

// The inputs as every kernel reads them: checked, with the level table built, value's channels and the
// whole of locations and weights contiguous. An expanded or sliced value is used in place (the kernels take
// any batch, row and head stride); only a value whose channels are strided is copied.
struct KernelInputs {
  LevelTable levels;
  bool discrete;
  at::Tensor value, locations, weights;
};

inline KernelInputs prepare_inputs(const at::Tensor& value, at::IntArrayRef spatial_shapes,
                                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                   at::IntArrayRef num_points, c10::string_view method) {
  LevelTable levels = make_level_table(spatial_shapes, num_points);
  check_inputs(value, levels, sampling_locations, attention_weights);
  const bool discrete = is_discrete(std::string(method));
  return {std::move(levels), discrete, value.stride(3) == 1 ? value : value.contiguous(),
          sampling_locations.contiguous(), attention_weights.contiguous()};
}

// The fused op: in.locations and in.weights hold the raw sampling_offsets and attention_logits.
inline KernelInputs prepare_fused_inputs(const at::Tensor& value, at::IntArrayRef spatial_shapes,
                                         const at::Tensor& reference_points, const at::Tensor& sampling_offsets,
                                         const at::Tensor& attention_logits, at::IntArrayRef num_points,
                                         c10::string_view method) {
  KernelInputs in = prepare_inputs(value, spatial_shapes, sampling_offsets, attention_logits, num_points, method);
  TORCH_CHECK(reference_points.dim() == 4 && reference_points.size(0) == value.size(0) &&
                  reference_points.size(1) == sampling_offsets.size(1) &&
                  (reference_points.size(2) == 1 || reference_points.size(2) == in.levels.num_levels()) &&
                  (reference_points.size(3) == 2 || reference_points.size(3) == 4),
              "rtdetrv2_kernels: reference_points must be (B, Q, 1 or L, 4 or 2), got ", reference_points.sizes());
  TORCH_CHECK(reference_points.scalar_type() == value.scalar_type() && reference_points.device() == value.device(),
              "rtdetrv2_kernels: reference_points must have value's dtype and device");
  return in;
}

}  // namespace rtdetrv2_kernels
