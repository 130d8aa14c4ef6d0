// The launch code of the CUDA kernels (ms_deform_attn_kernels.cuh): the torch-facing ops, their checks, the
// choice of vector width, method and gradient sink, and the deterministic mode's buffers.
#include "cuda_runtime.h"  // first: in the emulated build it defines __CUDA_ARCH__ for what follows

#include <tuple>
#include <type_traits>

#include "../ms_deform_attn.h"
#include "ms_deform_attn_kernels.cuh"

namespace rtdetrv2_kernels {
namespace {

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

template <typename scalar_t>
int vector_width_of(const at::Tensor& value, const at::Tensor& other) {
  return vector_width<scalar_t>(value.size(3), {value.stride(0), value.stride(1), value.stride(2)},
                                {value.const_data_ptr(), other.const_data_ptr()});
}

Geometry geometry_of(const KernelInputs& in, int vec) {
  const at::Tensor& value = in.value;
  return make_geometry(in.locations.size(1), value.size(2), value.size(3), in.locations.size(3), vec, value.size(1),
                       value.stride(0), value.stride(1), value.stride(2));
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
    const int vec = vector_width_of<scalar_t>(in.value, output);
    const Geometry g = geometry_of(in, vec);
    constexpr int kWide = 16 / sizeof(scalar_t);
    const int point_lane_count =
        point_lanes(g, vec == kWide, /*forward=*/true, in.value.nbytes() <= gpu::l2_cache_bytes());
    const int64_t total = output.numel() / vec * point_lane_count;
    const int block = threads_per_block(total, gpu::multiprocessor_count());
    dispatch_width_and_method<kWide>(vec, in.discrete, [&]<int VEC, bool kDiscrete>() {
      const auto launch = [&](auto lanes) {
        gpu::launch<forward_kernel<scalar_t, VEC, decltype(lanes)::value, kDiscrete, std::decay_t<decltype(points)>,
                                   Levels>>(blocks_for(total, block), block, stream,
                                            in.value.const_data_ptr<scalar_t>(), points,
                                            output.mutable_data_ptr<scalar_t>(), g, levels, total);
      };
      if constexpr (VEC == kWide) {
        dispatch_point_lanes<kMaxForwardPointLanes>(point_lane_count, launch);
      } else {
        launch(std::integral_constant<int, 1>());
      }
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
  check_grad_output(grad_output, in.value, in.locations.size(1));
  const auto acc_options = in.value.options().dtype(at::toOpMathType(in.value.scalar_type()));
  at::Tensor grad_value;
  at::Tensor grad_locations = at::zeros(in.locations.sizes(), acc_options);
  at::Tensor grad_weights = at::zeros(in.weights.sizes(), acc_options);
  if (grad_output.numel() == 0) {
    return {at::zeros(in.value.sizes(), in.value.options()), grad_locations, grad_weights};
  }
  const gpu::Stream stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto points = make_points(static_cast<scalar_t*>(nullptr));
    const int vec = vector_width_of<scalar_t>(in.value, grad_output);
    const Geometry g = geometry_of(in, vec);
    const bool shuffle = shuffles_within_groups(g);
    constexpr int kWide = 16 / sizeof(scalar_t);
    const int point_lane_count =
        point_lanes(g, vec == kWide, /*forward=*/false, in.value.nbytes() <= gpu::l2_cache_bytes());
    const int64_t total = grad_output.numel() / vec * point_lane_count;
    const int block = threads_per_block(total, gpu::multiprocessor_count());
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    if (deterministic && !shuffle) {
      // Raises, or warns under use_deterministic_algorithms(True, warn_only=True) and goes on with atomics.
      at::globalContext().alertNotDeterministic(
          "rtdetrv2_kernels ms_deform_attn backward (CUDA) when C / VEC is not a power of two up to 32 (VEC = the "
          "channels in 16 bytes when C and value's strides are multiples of it, else 1)");
    }
    using Points = std::decay_t<decltype(points)>;
    // Runs backward_kernel into `sink` for the runtime vector width, method and point lanes (which need
    // shuffles and the vectorized path; point_lanes() is 1 without them).
    const auto run_into = [&]<bool kShuffle, typename Sink>(const Sink& sink) {
      dispatch_width_and_method<kWide>(vec, in.discrete, [&]<int VEC, bool kDiscrete>() {
        const auto launch = [&](auto lanes) {
          gpu::launch<backward_kernel<scalar_t, VEC, decltype(lanes)::value, kDiscrete, kShuffle, Points, Levels,
                                      Sink>>(
              blocks_for(total, block), block, stream, grad_output.const_data_ptr<scalar_t>(),
              in.value.const_data_ptr<scalar_t>(), points, sink, grad_locations.mutable_data_ptr<acc_t>(),
              grad_weights.mutable_data_ptr<acc_t>(), g, levels, total);
        };
        if constexpr (kShuffle && VEC == kWide) {
          dispatch_point_lanes<kMaxPointLanes>(point_lane_count, launch);
        } else {
          launch(std::integral_constant<int, 1>());
        }
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
          reference.size(3), static_cast<acc_type<scalar_t>>(offset_scale)};
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
      using acc_t = acc_type<scalar_t>;
      gpu::launch<fused_backpropagate_kernel<scalar_t>>(
          blocks_for(total_bqh), kThreadsPerBlock, stream, fused_points<scalar_t>(in, reference, offset_scale), levels,
          grad_weights.const_data_ptr<acc_t>(), in.discrete ? nullptr : grad_locations.const_data_ptr<acc_t>(),
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
