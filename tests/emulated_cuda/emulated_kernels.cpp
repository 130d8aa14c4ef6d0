// csrc/cuda/ms_deform_attn_cuda.cu itself, compiled by g++ against the emulation (cuda_emulation.h, through
// the seam csrc/cuda/cuda_runtime.h), with the op schemas and their autograd formula under this build's own
// namespace and the emulation's test hooks.
#include "cuda/ms_deform_attn_cuda.cu"
#include "ms_deform_attn_autograd.h"
#include "ms_deform_attn_schema.h"
#include "planted_kernels.h"

TORCH_LIBRARY(RTDETRV2_EMULATED_OPS, m) {
  rtdetrv2_kernels::define_ms_deform_attn_ops(m);
  // One line per kernel instantiation that the sources launch: "<launches so far>\t<name>".
  m.def("emulated_launch_counts() -> str", &rtdetrv2_cuda_emulation::launch_counts);
  // Kernels with planted defects, for the emulation's own tests (planted_kernels.h).
  m.def("planted_kernel(str name, Tensor data) -> ()", &rtdetrv2_cuda_emulation::run_planted_kernel);
}

TORCH_LIBRARY_IMPL(RTDETRV2_EMULATED_OPS, Autograd, m) { rtdetrv2_kernels::register_autograd_kernels(m); }
