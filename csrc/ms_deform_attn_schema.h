#pragma once
// The schemas of the ops, in one place: csrc/ms_deform_attn.cpp defines them under rtdetrv2_kernels,
// the test suite's emulated CUDA build (tests/emulated_cuda/) under a namespace of its own.
#include <torch/library.h>

namespace rtdetrv2_kernels {

inline void define_ms_deform_attn_ops(torch::Library& m) {
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
  // The plain op with the level table in tensors, for callers whose shapes live on the device
  // (Deformable DETR's convention): spatial_shapes (L, 2) and level_start_index (L,), int64 on value's device.
  // Levels may sit anywhere in value's rows. The kernels read the table where it lives, so no call needs a
  // host-device sync (docs/semantics.md, "Level shapes in tensors").
  m.def(
      "ms_deform_attn_forward_tensor_levels(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, int[] num_points, str method) -> Tensor");
  m.def(
      "ms_deform_attn_backward_tensor_levels(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, int[] num_points, "
      "str method) -> (Tensor, Tensor, Tensor)");
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
}

}  // namespace rtdetrv2_kernels
