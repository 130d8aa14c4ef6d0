// The op library: the schemas (ms_deform_attn_schema.h) and the CPU cache op. Kernels register per device in
// cpu/ and cuda/; the fake (meta) kernels and the autograd formula are registered from Python
// (rtdetrv2_kernels/_registration.py).
#include <torch/library.h>

#include "cpu/buffer_pool.h"
#include "ms_deform_attn_schema.h"

TORCH_LIBRARY(rtdetrv2_kernels, m) {
  rtdetrv2_kernels::define_ms_deform_attn_ops(m);
  // Releases the large CPU gradient buffers kept for reuse (cpu/buffer_pool.cpp).
  m.def("empty_cpu_cache() -> ()", &rtdetrv2_kernels::empty_cpu_cache);
}
