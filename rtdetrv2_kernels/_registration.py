"""Fake (meta) kernels of the C++ ops defined in csrc/ms_deform_attn.cpp, and their backward ops' derivative
(second derivatives); the forward ops' autograd formula is C++ (csrc/ms_deform_attn_autograd.h).

Imported once the library that defines the ops has been loaded (see _extension.load).
"""

from __future__ import annotations

from ._op_formulas import register_op_pairs

register_op_pairs("rtdetrv2_kernels")
