"""Backend selection: which implementation runs a call of ms_deform_attn.

Precedence: the ``backend`` argument, then the ``RTDETRV2_KERNELS_BACKEND`` environment variable, then the
fastest backend available for the tensors' device (CUDA: "cuda", "triton", "torch"; CPU: "cpu", "torch").
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from . import _build_config, _extension
from ._export_options import export_bilinear
from .reference import ms_deform_attn_fused_reference, ms_deform_attn_reference

BACKENDS = ("cuda", "triton", "cpu", "torch")
ENV_VAR = "RTDETRV2_KERNELS_BACKEND"
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def _custom_op(name: str, namespace: str = "rtdetrv2_kernels"):
    """Calls torch.ops.<namespace>.<name>, whose schema takes the level shapes flattened; the other
    arguments (the plain op's or the fused op's) pass as given."""

    def run(value, spatial_shapes, *arguments):
        flat_shapes = [size for shape in spatial_shapes for size in shape]
        return getattr(getattr(torch.ops, namespace), name)(value, flat_shapes, *arguments)

    return run


# "cpu" and "cuda" are the same C++ op; the dispatcher picks the kernel by the tensors' device.
_IMPLEMENTATIONS = {
    "cuda": _custom_op("ms_deform_attn_forward"),
    "cpu": _custom_op("ms_deform_attn_forward"),
    "triton": _custom_op("triton_ms_deform_attn_forward"),
    "torch": ms_deform_attn_reference,
}


def _tensor_levels_op(namespace: str = "rtdetrv2_kernels"):
    """Calls torch.ops.<namespace>.ms_deform_attn_forward_tensor_levels: (value, spatial_shapes (L, 2),
    level_start_index (L,), locations, weights, points, method), the table as int64 tensors on value's device."""

    def run(*arguments):
        return getattr(torch.ops, namespace).ms_deform_attn_forward_tensor_levels(*arguments)

    return run


# The backends whose kernels read a level table from tensors where they live (compat's Deformable-DETR
# layout); the others take level shapes as Python ints.
_TENSOR_LEVEL_IMPLEMENTATIONS = {"cuda": _tensor_levels_op(), "cpu": _tensor_levels_op()}


# Backends outside BACKENDS, by name: the device type they run on. Only the test suite adds any (the CUDA
# kernels emulated on the CPU, tests/emulated_cuda/); users never see them in available_backends().
_EXTRA_DEVICE_TYPES: dict[str, str] = {}


def register_extra_backend(name: str, namespace: str, device_type: str) -> None:
    """Makes `name` a backend running torch.ops.<namespace>'s ms_deform_attn_forward,
    ms_deform_attn_forward_tensor_levels and ms_deform_attn_fused_forward (schemas and autograd as the
    rtdetrv2_kernels ops) on `device_type` tensors."""
    _EXTRA_DEVICE_TYPES[name] = device_type
    _IMPLEMENTATIONS[name] = _custom_op("ms_deform_attn_forward", namespace)
    _FUSED_IMPLEMENTATIONS[name] = _custom_op("ms_deform_attn_fused_forward", namespace)
    _TENSOR_LEVEL_IMPLEMENTATIONS[name] = _tensor_levels_op(namespace)
    _RESOLVED.clear()


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None when `backend` can run on tensors of `device_type` here, else why it cannot."""
    if backend in _EXTRA_DEVICE_TYPES:
        wanted = _EXTRA_DEVICE_TYPES[backend]
        return None if device_type == wanted else f"it runs on {wanted} tensors, got {device_type} tensors"
    if backend == "torch":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"it runs on CPU tensors, got {device_type} tensors"
        reason = _extension.load("_C")
        return None if reason is None else f"the C++ kernels could not be loaded ({reason})"
    if backend == "cuda":
        if device_type != "cuda":
            return f"it runs on CUDA tensors, got {device_type} tensors"
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        reason = _extension.load("_C_cuda")
        if reason is not None:
            return f"the CUDA kernels could not be loaded ({reason})"
        return _gpu_mismatch_reason(_extension.cuda_archs())
    if backend == "triton":
        return _triton_unavailable_reason(device_type)
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def _gpu_mismatch_reason(archs: str | None) -> str | None:
    """Why a CUDA library built for `archs` cannot run on the current GPU (every call would fail with "no
    kernel image is available"), or None."""
    if archs is None:
        return None
    capability = torch.cuda.get_device_capability()
    if _build_config.runs_on(archs, capability):
        return None
    return (f"they were built for compute capabilities {archs}, not this GPU's {capability[0]}.{capability[1]} "
            "(rebuild with TORCH_CUDA_ARCH_LIST including it)")


def _triton_unavailable_reason(device_type: str) -> str | None:
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "it runs on CUDA tensors (or on CPU tensors in Triton's interpreter, TRITON_INTERPRET=1)"
    elif device_type != "cuda":
        return f"it runs on CUDA tensors, got {device_type} tensors"
    try:
        from . import triton_ms_deform_attn  # noqa: F401
    except ImportError as error:
        return f"Triton could not be imported ({error})"
    return None


def available_backends() -> list[str]:
    """The backends that can run here, on the CPU or on this machine's GPU, fastest first."""
    device_types = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    return [b for b in BACKENDS if any(unavailable_reason(b, d) is None for d in device_types)]


@functools.cache
def _warn_fallback(device_type: str, skipped: str) -> None:
    warnings.warn(f"rtdetrv2_kernels: falling back to the slow 'torch' backend on {device_type}: {skipped}", stacklevel=4)


# What each (backend argument, device type, environment variable) resolved to: availability does not change
# within a process, and eager calls then skip the lookups (a few microseconds each call).
_RESOLVED: dict[tuple[str | None, str, str | None], str] = {}


# torch.compile runs this once per (backend, device type) while tracing and bakes in the answer, so the
# environment lookup and the first-use library load stay out of the compiled graph.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str | None, device_type: str) -> str:
    key = (backend, device_type, os.environ.get(ENV_VAR))
    resolved = _RESOLVED.get(key)
    if resolved is None:
        resolved = _RESOLVED[key] = _resolve(backend, device_type)
    return resolved


def _resolve(backend: str | None, device_type: str) -> str:
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"{ENV_VAR}={backend!r}"
    else:
        source = f"backend={backend!r}"
    if backend is not None:
        if backend not in BACKENDS and backend not in _EXTRA_DEVICE_TYPES:
            raise ValueError(f"{source}: backend must be one of {BACKENDS} or None")
        reason = unavailable_reason(backend, device_type)
        if reason is not None:
            raise RuntimeError(f"{source} is not available: {reason}")
        return backend
    skipped = []
    for candidate in _PREFERENCE.get(device_type, ("torch",)):
        reason = unavailable_reason(candidate, device_type)
        if reason is None:
            if skipped and candidate == "torch":
                _warn_fallback(device_type, "; ".join(skipped))
            return candidate
        skipped.append(f"'{candidate}' is unavailable: {reason}")
    raise AssertionError("the torch backend is always available")


# torch.onnx.export (either exporter) cannot translate the custom ops: while it traces, the reference, made of
# standard operators, runs in their place. torch.compile folds the check to False.
def _exported(reference):
    """The reference as an export writes it: bilinear sampling in the form export_options chose."""
    return functools.partial(reference, bilinear=export_bilinear())


def implementation(backend: str):
    """The function running `backend`: (value, level shapes, locations, weights, points, method) -> output.
    The reference while torch.onnx.export traces (bilinear sampling as export_options says)."""
    if torch.onnx.is_in_onnx_export():
        return _exported(ms_deform_attn_reference)
    return _IMPLEMENTATIONS[backend]


# As for the plain op, "cpu" and "cuda" are one C++ op whose kernel the dispatcher picks by device. The C++
# and Triton kernels compute the softmax and the locations themselves; the reference uses PyTorch ops.
_FUSED_IMPLEMENTATIONS = {
    "cuda": _custom_op("ms_deform_attn_fused_forward"),
    "triton": _custom_op("triton_ms_deform_attn_fused_forward"),
    "cpu": _custom_op("ms_deform_attn_fused_forward"),
    "torch": ms_deform_attn_fused_reference,
}


def fused_implementation(backend: str):
    """The function running ms_deform_attn_fused on `backend`: (value, level shapes, reference_points,
    sampling_offsets, attention_logits, points, offset_scale, method) -> output. The reference while
    torch.onnx.export traces (bilinear sampling as export_options says)."""
    if torch.onnx.is_in_onnx_export():
        return _exported(ms_deform_attn_fused_reference)
    return _FUSED_IMPLEMENTATIONS[backend]


def tensor_levels_implementation(backend: str):
    """The function running the plain op on `backend` with the level table in tensors, or None where the
    backend has none (its caller then reads the table on the host). None while torch.onnx.export traces."""
    return None if torch.onnx.is_in_onnx_export() else _TENSOR_LEVEL_IMPLEMENTATIONS.get(backend)
