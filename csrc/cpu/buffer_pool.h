#pragma once
// Zero-filled CPU buffers for the gradients that the backward kernels add into (buffer_pool.cpp).
#include <ATen/core/Tensor.h>

namespace rtdetrv2_kernels {

// A contiguous zero-filled CPU tensor. Large ones (32 MiB and up) come from a small pool of mappings kept
// across calls, so that a backward does not page-fault a fresh grad_value on every call.
at::Tensor zeros_for_accumulation(at::IntArrayRef sizes, at::ScalarType dtype);

// Unmaps the pool's idle buffers (the op rtdetrv2_kernels::empty_cpu_cache; Python: empty_cache()).
void empty_cpu_cache();

}  // namespace rtdetrv2_kernels
