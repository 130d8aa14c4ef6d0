// The op library: the schemas (ms_deform_attn_schema.h), their autograd formula (ms_deform_attn_autograd.h)
// and the CPU cache op. Kernels register per device in cpu/ and cuda/; the fake (meta) kernels and the backward
// ops' own derivative are registered from Python (rtdetrv2_kernels/_registration.py).
#include <torch/library.h>

#include "cpu/buffer_pool.h"
#include "ms_deform_attn_autograd.h"
#include "ms_deform_attn_schema.h"

TORCH_LIBRARY(rtdetrv2_kernels, m) {
  rtdetrv2_kernels::define_ms_deform_attn_ops(m);
  // Releases the large CPU gradient buffers kept for reuse (cpu/buffer_pool.cpp).
  m.def("empty_cpu_cache() -> ()", &rtdetrv2_kernels::empty_cpu_cache);
}

TORCH_LIBRARY_IMPL(rtdetrv2_kernels, Autograd, m) { rtdetrv2_kernels::register_autograd_kernels(m); }
