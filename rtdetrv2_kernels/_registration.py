"""Fake (meta) kernels and the autograd formulas of the C++ ops defined in csrc/ms_deform_attn.cpp.

Imported once the library that defines the ops has been loaded (see _extension.load).
"""

from __future__ import annotations

import torch

from ._op_formulas import backward_fake, forward_fake, register_autograd

for _forward, _backward in (
    ("ms_deform_attn_forward", "ms_deform_attn_backward"),
    ("ms_deform_attn_fused_forward", "ms_deform_attn_fused_backward"),
):
    torch.library.register_fake(f"rtdetrv2_kernels::{_forward}")(forward_fake)
    torch.library.register_fake(f"rtdetrv2_kernels::{_backward}")(backward_fake)
    register_autograd(f"rtdetrv2_kernels::{_forward}", getattr(torch.ops.rtdetrv2_kernels, _backward))
