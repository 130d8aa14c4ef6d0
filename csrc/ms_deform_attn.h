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

// The levels as the host knows them. points is always filled; height, width and start are empty in the
// tensor form on a GPU, whose shapes and starts stay in device memory (points_only_level_table).
struct LevelTable {
  std::vector<int32_t> height;
  std::vector<int32_t> width;
  std::vector<int64_t> start;   // first row of the level in value's sequence dimension
  std::vector<int64_t> points;  // sampling points per head on this level
  int64_t num_levels() const { return static_cast<int64_t>(points.size()); }
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
    TORCH_CHECK_VALUE(h > 0 && w > 0 && h <= std::numeric_limits<int32_t>::max() / w,
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

// What messages call the two per-point tensors: the plain op's, or the fused op's raw offsets and logits.
struct PointTensorNames {
  const char* locations;
  const char* weights;
};
constexpr PointTensorNames kPlainNames{"sampling_locations", "attention_weights"};
constexpr PointTensorNames kFusedNames{"sampling_offsets", "attention_logits"};

// Every tensor argument has value's dtype and device, checked by name: a raw call may mix devices.
inline void check_like_value(const char* name, const at::Tensor& tensor, const at::Tensor& value) {
  TORCH_CHECK_TYPE(tensor.scalar_type() == value.scalar_type(), "rtdetrv2_kernels: ", name, " has dtype ",
                   tensor.scalar_type(), " but value has ", value.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(tensor.device() == value.device(), "rtdetrv2_kernels: ", name, " is on ", tensor.device(),
                    " but value is on ", value.device(), "; every tensor argument must be on value's device");
}

inline void check_inputs(const at::Tensor& value, const LevelTable& levels, const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights, const PointTensorNames& names) {
  TORCH_CHECK(value.dim() == 4, "rtdetrv2_kernels: value must be (B, S, H, C), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 5 && sampling_locations.size(4) == 2, "rtdetrv2_kernels: ",
              names.locations, " must be (B, Q, H, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 4, "rtdetrv2_kernels: ", names.weights, " must be (B, Q, H, P), got ",
              attention_weights.sizes());
  int64_t total_points = 0;
  for (int64_t p : levels.points) total_points += p;
  const int64_t B = value.size(0), H = value.size(2), Q = sampling_locations.size(1);
  TORCH_CHECK(sampling_locations.sizes() == at::IntArrayRef({B, Q, H, total_points, 2}), "rtdetrv2_kernels: ",
              names.locations, " must be (B, Q, H, P, 2) = (", B, ", Q, ", H, ", ", total_points, ", 2), got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef({B, Q, H, total_points}), "rtdetrv2_kernels: ",
              names.weights, " must be (B, Q, H, P) = (", B, ", ", Q, ", ", H, ", ", total_points, "), got ",
              attention_weights.sizes());
  check_like_value(names.locations, sampling_locations, value);
  check_like_value(names.weights, attention_weights, value);
}

// The list form packs the levels back to back: value's rows must be exactly theirs.
inline void check_rows_match_levels(const at::Tensor& value, const LevelTable& levels) {
  const int64_t total_rows = levels.start.back() + static_cast<int64_t>(levels.height.back()) * levels.width.back();
  TORCH_CHECK(value.size(1) == total_rows, "rtdetrv2_kernels: value has S=", value.size(1),
              " but the spatial shapes sum to ", total_rows);
}

// The tensor form (the *_tensor_levels ops): what the host can check of the table without reading it.
inline void check_level_tensors(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                const at::Tensor& level_start_index, at::IntArrayRef num_points) {
  const int64_t num_levels = static_cast<int64_t>(num_points.size());
  TORCH_CHECK_VALUE(value.dim() == 4, "rtdetrv2_kernels: value must be (B, S, H, C), got ", value.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == num_levels && spatial_shapes.size(1) == 2,
                    "rtdetrv2_kernels: spatial_shapes must be (L, 2) with L = ", num_levels,
                    " (the entries of num_points), got ", spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == num_levels,
                    "rtdetrv2_kernels: level_start_index must be (L,) with L = ", num_levels, ", got ",
                    level_start_index.sizes());
  for (const auto& [name, table] : {std::pair<const char*, const at::Tensor*>{"spatial_shapes", &spatial_shapes},
                                     {"level_start_index", &level_start_index}}) {
    TORCH_CHECK_TYPE(table->scalar_type() == at::kLong, "rtdetrv2_kernels: ", name, " must be int64, got ",
                     table->scalar_type());
    TORCH_CHECK_VALUE(table->device() == value.device(), "rtdetrv2_kernels: ", name, " is on ", table->device(),
                      " but value is on ", value.device(), "; every tensor argument must be on value's device");
  }
}

// The tensor form's table where the kernels run on the host: read, and checked as make_level_table checks the
// list form, except that each level may start anywhere in value's rows as long as all of it lies inside them.
inline LevelTable read_level_tensors(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                     const at::Tensor& level_start_index, at::IntArrayRef num_points) {
  check_level_tensors(value, spatial_shapes, level_start_index, num_points);
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  LevelTable table = make_level_table(at::IntArrayRef(shapes.const_data_ptr<int64_t>(), shapes.numel()), num_points);
  const int64_t rows = value.size(1);
  const int64_t* start = starts.const_data_ptr<int64_t>();
  for (int64_t l = 0; l < table.num_levels(); ++l) {
    const int64_t size = static_cast<int64_t>(table.height[l]) * table.width[l];
    TORCH_CHECK_VALUE(start[l] >= 0 && start[l] <= rows - size, "rtdetrv2_kernels: level_start_index[", l,
                      "] = ", start[l], " puts level ", l, " (", size, " rows) outside value's ", rows, " rows");
    table.start[l] = start[l];
  }
  return table;
}

// The tensor form's table where the kernels run on a GPU: only the point counts, which are host arguments.
// The shapes and starts stay in device memory, and the kernels check each level against value's rows.
inline LevelTable points_only_level_table(at::IntArrayRef num_points) {
  LevelTable table;
  for (size_t l = 0; l < num_points.size(); ++l) {
    TORCH_CHECK(num_points[l] > 0, "rtdetrv2_kernels: num_points[", l, "] must be positive, got ", num_points[l]);
    table.points.push_back(num_points[l]);
  }
  TORCH_CHECK(!table.points.empty(), "rtdetrv2_kernels: num_points must hold one count per level");
  return table;
}

// The backward's grad_output: (B, Q, H*C) in value's dtype, on value's device.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, int64_t queries) {
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({value.size(0), queries, value.size(2) * value.size(3)}),
                    "rtdetrv2_kernels: grad_output must be (B, Q, H*C) = (", value.size(0), ", ", queries, ", ",
                    value.size(2) * value.size(3), "), got ", grad_output.sizes());
  check_like_value("grad_output", grad_output, value);
}

// The inputs as every kernel reads them: checked, with the level table built, value's channels and the
// whole of locations and weights contiguous. An expanded or sliced value is used in place (the kernels take
// any batch, row and head stride); only a value whose channels are strided is copied.
struct KernelInputs {
  LevelTable levels;
  bool discrete;
  at::Tensor value, locations, weights;
};

inline KernelInputs prepare_inputs(LevelTable levels, const at::Tensor& value, const at::Tensor& sampling_locations,
                                   const at::Tensor& attention_weights, c10::string_view method,
                                   const PointTensorNames& names = kPlainNames) {
  check_inputs(value, levels, sampling_locations, attention_weights, names);
  const bool discrete = is_discrete(std::string(method));
  return {std::move(levels), discrete, value.stride(3) == 1 ? value : value.contiguous(),
          sampling_locations.contiguous(), attention_weights.contiguous()};
}

// The list form: spatial_shapes flattened, levels back to back.
inline KernelInputs prepare_inputs(const at::Tensor& value, at::IntArrayRef spatial_shapes,
                                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                   at::IntArrayRef num_points, c10::string_view method,
                                   const PointTensorNames& names = kPlainNames) {
  LevelTable levels = make_level_table(spatial_shapes, num_points);
  KernelInputs in = prepare_inputs(std::move(levels), value, sampling_locations, attention_weights, method, names);
  check_rows_match_levels(in.value, in.levels);
  return in;
}

// The fused op: in.locations and in.weights hold the raw sampling_offsets and attention_logits.
inline KernelInputs prepare_fused_inputs(const at::Tensor& value, at::IntArrayRef spatial_shapes,
                                         const at::Tensor& reference_points, const at::Tensor& sampling_offsets,
                                         const at::Tensor& attention_logits, at::IntArrayRef num_points,
                                         c10::string_view method) {
  KernelInputs in =
      prepare_inputs(value, spatial_shapes, sampling_offsets, attention_logits, num_points, method, kFusedNames);
  TORCH_CHECK(reference_points.dim() == 4 && reference_points.size(0) == value.size(0) &&
                  reference_points.size(1) == sampling_offsets.size(1) &&
                  (reference_points.size(2) == 1 || reference_points.size(2) == in.levels.num_levels()) &&
                  (reference_points.size(3) == 2 || reference_points.size(3) == 4),
              "rtdetrv2_kernels: reference_points must be (B, Q, 1 or L, 4 or 2), got ", reference_points.sizes());
  check_like_value("reference_points", reference_points, value);
  return in;
}

}  // namespace rtdetrv2_kernels
