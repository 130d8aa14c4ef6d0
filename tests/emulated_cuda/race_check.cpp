// ThreadSanitizer over the emulated CUDA kernels (race_check.py builds this with -fsanitize=thread; TSan
// cannot be preloaded into CPython). Runs the six ops through the dispatcher on a few small shapes, in
// every dtype, both methods and both accumulation modes, each emulated thread a TSan fiber of its own, so
// that two lanes, warps or blocks touching one address without an atomic are reported. `race_check
// planted` runs a kernel with a planted race instead, which must be reported.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)

namespace {

const std::string kNamespace = STRINGIFY(RTDETRV2_EMULATED_OPS);

c10::OperatorHandle op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((kNamespace + "::" + name).c_str(), "");
}

int64_t launches = 0;

void run_shape(at::ScalarType dtype, int64_t channels, const std::string& method, bool deterministic) {
  // Small levels, so that many samples land on each pixel; each emulated thread costs TSan a fiber.
  const std::vector<int64_t> shapes = {2, 4, 4, 2, 3, 1};
  const std::vector<int64_t> points = {3, 6, 2};
  const int64_t B = 2, Q = 16, H = 2, S = 2 * 4 + 4 * 2 + 3 * 1, P = 11;
  const auto options = at::TensorOptions().dtype(dtype);
  const at::Tensor value = at::randn({B, S, H, channels}, options);
  const at::Tensor locations = at::rand({B, Q, H, P, 2}, options) * 1.4 - 0.2;
  const at::Tensor weights = at::rand({B, Q, H, P}, options);
  const at::Tensor grad_output = at::randn({B, Q, H * channels}, options);
  at::globalContext().setDeterministicAlgorithms(deterministic, false);
  op("ms_deform_attn_forward")
      .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                        c10::string_view)>()
      .call(value, shapes, locations, weights, points, method);
  op("ms_deform_attn_backward")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                                            const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                                            c10::string_view)>()
      .call(grad_output, value, shapes, locations, weights, points, method);
  // The tensor form: the same levels in reverse order, the table in int64 tensors.
  const at::Tensor reversed = at::cat({value.narrow(1, 16, 3), value.narrow(1, 8, 8), value.narrow(1, 0, 8)}, 1);
  const at::Tensor shape_table = at::tensor(shapes, at::kLong).view({3, 2});
  const at::Tensor start_table = at::tensor(std::vector<int64_t>{11, 3, 0}, at::kLong);
  op("ms_deform_attn_forward_tensor_levels")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        at::IntArrayRef, c10::string_view)>()
      .call(reversed, shape_table, start_table, locations, weights, points, method);
  op("ms_deform_attn_backward_tensor_levels")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            at::IntArrayRef, c10::string_view)>()
      .call(grad_output, reversed, shape_table, start_table, locations, weights, points, method);
  const at::Tensor boxes = at::cat({at::rand({B, Q, 1, 2}, options), at::rand({B, Q, 1, 2}, options) * 0.5 + 0.1}, -1);
  const at::Tensor offsets = at::randn({B, Q, H, P, 2}, options);
  op("ms_deform_attn_fused_forward")
      .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        at::IntArrayRef, double, c10::string_view)>()
      .call(value, shapes, boxes, offsets, weights, points, 0.5, method);
  op("ms_deform_attn_fused_backward")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, at::IntArrayRef, const at::Tensor&, const at::Tensor&,
          const at::Tensor&, at::IntArrayRef, double, c10::string_view)>()
      .call(grad_output, value, shapes, boxes, offsets, weights, points, 0.5, method);
  at::globalContext().setDeterministicAlgorithms(false, false);
  launches += 6;
}

}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(1);
  at::manual_seed(0);
  if (argc > 1 && std::strcmp(argv[1], "planted") == 0) {
    op("planted_kernel").typed<void(c10::string_view, const at::Tensor&)>().call("racing_store", at::zeros({32}));
    std::printf("the planted race ran\n");
    return 0;
  }
  for (const auto dtype : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16}) {
    for (const int64_t channels : {3, 32}) {  // atomics (3 lanes) and the wide shuffle path (8 lanes in fp32)
      for (const char* method : {"default", "discrete"}) {
        run_shape(dtype, channels, method, false);
        if (channels == 32) run_shape(dtype, channels, method, true);
      }
    }
  }
  std::printf("%lld launches checked\n", static_cast<long long>(launches));
  return 0;
}
