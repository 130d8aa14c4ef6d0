// The op schemas. Kernels register per device in cpu/ and cuda/; the fake (meta) kernels and the autograd
// formula are registered from Python (rtdetrv2_kernels/_registration.py).
#include <torch/library.h>

#include "cpu/buffer_pool.h"

TORCH_LIBRARY(rtdetrv2_kernels, m) {
  // spatial_shapes is flattened (H_0, W_0, H_1, W_1, ...); num_points holds one count per level;
  // method is "default" (bilinear) or "discrete" (nearest pixel). Returns (B, Q, H*C).
  m.def(
      "ms_deform_attn_forward(Tensor value, int[] spatial_shapes, Tensor sampling_locations, "
      "Tensor attention_weights, int[] num_points, str method) -> Tensor");
  // Returns the gradients of value, sampling_locations and attention_weights.
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, int[] spatial_shapes, "
      "Tensor sampling_locations, Tensor attention_weights, int[] num_points, str method) "
      "-> (Tensor, Tensor, Tensor)");
  // The fused op (docs/semantics.md): reference_points (B, Q, 1 or L, 4 or 2), raw sampling_offsets
  // (B, Q, H, P, 2) and attention_logits (B, Q, H, P) in place of locations and weights.
  m.def(
      "ms_deform_attn_fused_forward(Tensor value, int[] spatial_shapes, Tensor reference_points, "
      "Tensor sampling_offsets, Tensor attention_logits, int[] num_points, float offset_scale, str method) "
      "-> Tensor");
  // Returns the gradients of value, reference_points, sampling_offsets and attention_logits.
  m.def(
      "ms_deform_attn_fused_backward(Tensor grad_output, Tensor value, int[] spatial_shapes, "
      "Tensor reference_points, Tensor sampling_offsets, Tensor attention_logits, int[] num_points, "
      "float offset_scale, str method) -> (Tensor, Tensor, Tensor, Tensor)");
  // Releases the large CPU gradient buffers kept for reuse (cpu/buffer_pool.cpp).
  m.def("empty_cpu_cache() -> ()", &rtdetrv2_kernels::empty_cpu_cache);
}
