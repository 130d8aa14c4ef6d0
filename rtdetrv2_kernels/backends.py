"""Backend selection: which implementation runs a call of ms_deform_attn.

Each backend is one record (:class:`Backend`): the device types and dtypes it serves, its entries (the plain
op, the fused op, and the plain op with the level table in tensors), whether its backward is deterministic,
and the input-dependent limits of its kernels. ``not_supported_reasons(call)`` says why it cannot run a call.

Precedence: the ``backend`` argument, then the ``RTDETRV2_KERNELS_BACKEND`` environment variable, then the
first backend in ``BACKENDS`` (fastest first) with no reason against the call. A named backend that cannot run
the call raises with its reasons; automatic selection skips it (17 levels on a GPU: "triton", not "cuda").
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import _build_config, _extension, _op_formulas
from ._export_options import export_bilinear
from .reference import ms_deform_attn_fused_reference, ms_deform_attn_reference

ENV_VAR = "RTDETRV2_KERNELS_BACKEND"
ANY_DEVICE = "any"  # in device_types: tensors of every device type (the reference, made of PyTorch ops)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PLAIN_PER_POINT = 2  # the plain op's tensors after value: sampling_locations, attention_weights
FUSED_PER_POINT = 3  # the fused op's: reference_points, sampling_offsets, attention_logits


_DEVICE_NAMES = {"cpu": "CPU", "cuda": "CUDA"}


class Call(NamedTuple):
    """What backend selection looks at in a call: Python values, which torch.compile treats as constants."""

    device_type: str
    dtype: torch.dtype
    num_levels: int


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the ops.

    plain: (value, level shapes, locations, weights, points, method) -> output.
    fused: (value, level shapes, reference_points, sampling_offsets, attention_logits, points, offset_scale,
        method) -> output.
    tensor_levels: (value, spatial_shapes (L, 2), level_start_index (L,), locations, weights, points, method)
        -> output, the table as int64 tensors on value's device; None where the backend reads level shapes as
        Python ints only (its caller then reads the table on the host).
    device_types: where automatic selection may choose it. explicit_device_types: where it also runs when
        named (Triton's interpreter on CPU tensors, the emulated CUDA builds of the test suite).
    unavailable: device type -> why it cannot run here at all (a library that did not load, no GPU), or None.
    """

    name: str
    plain: Callable
    fused: Callable
    tensor_levels: Callable | None
    device_types: tuple[str, ...]
    deterministic: bool  # its backward gives the same bits every run, also under use_deterministic_algorithms
    explicit_device_types: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    max_levels: int | None = None
    unavailable: Callable[[str], str | None] = lambda device_type: None

    def chosen_automatically_on(self, device_type: str) -> bool:
        return device_type in self.device_types or ANY_DEVICE in self.device_types

    def unavailable_reason(self, device_type: str) -> str | None:
        """Why it cannot run on tensors of `device_type` on this machine, whatever the input, or None."""
        if not self.chosen_automatically_on(device_type) and device_type not in self.explicit_device_types:
            served = " or ".join(_DEVICE_NAMES.get(t, t) for t in self.device_types + self.explicit_device_types)
            return f"it runs on {served} tensors, got {device_type} tensors"
        return self.unavailable(device_type)

    def not_supported_reasons(self, call: Call) -> list[str]:
        """Why it cannot run `call` (empty when it can)."""
        reason = self.unavailable_reason(call.device_type)
        if reason is not None:
            return [reason]
        reasons = []
        if call.dtype not in self.dtypes:
            reasons.append(f"its kernels take {', '.join(str(d).replace('torch.', '') for d in self.dtypes)}, "
                           f"got {str(call.dtype).replace('torch.', '')}")
        if self.max_levels is not None and call.num_levels > self.max_levels:
            reasons.append(f"its kernels take up to {self.max_levels} levels, got {call.num_levels}")
        return reasons


def _onnx_export_flags():
    """The two flags torch.onnx.is_in_onnx_export() reads, found once; None where this torch keeps them
    elsewhere (then it is called)."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return None
    if not hasattr(_flags, "_is_onnx_exporting") or not hasattr(GLOBALS, "in_onnx_export"):
        return None
    return _flags, GLOBALS


_UNSET = object()
_onnx_flags = _UNSET  # found at the first call: torch.onnx takes 20 ms to import


def in_onnx_export() -> bool:
    """torch.onnx.is_in_onnx_export() without its imports on every call (a microsecond, a sixth of a small
    call's cost)."""
    global _onnx_flags
    if torch.compiler.is_compiling():  # traced: the official check, which torch.compile folds
        return torch.onnx.is_in_onnx_export()
    if _onnx_flags is _UNSET:
        _onnx_flags = _onnx_export_flags()
    if _onnx_flags is None:
        return torch.onnx.is_in_onnx_export()
    return _onnx_flags[1].in_onnx_export or _onnx_flags[0]._is_onnx_exporting


def call_python_op(op, tensors, *arguments):
    """op(*arguments) for an op defined in Python (Triton's; `tensors`: its tensor arguments), whose autograd
    kernel (torch.library.register_autograd) is a Python function that costs more than the rest of a small
    call: eager calls of plain tensors skip it, below autograd where nothing needs a gradient, and through
    _op_formulas.EagerCall (the same formula) where something does. Traced calls (torch.compile, export),
    functorch transforms and tensor subclasses take the op's own path. The C++ ops need none of this: their
    autograd kernel is C++ (csrc/ms_deform_attn_autograd.h)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return op(*arguments)
    for tensor in tensors:
        if type(tensor) is not torch.Tensor:
            return op(*arguments)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*tensors):
        return _op_formulas.EagerCall.apply(_op_formulas.GRADIENTS[op], *arguments)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*arguments)


class _LazyOp:
    """Returns torch.ops.<namespace>.<name>.default, looked up at its first call (the library defining it is
    loaded on first use). A plain object rather than functools.cache: torch 2.11's Dynamo binds a cached
    function kept as an instance attribute like a method, and breaks the graph on the extra argument."""

    def __init__(self, namespace: str, name: str):
        self._namespace, self._name, self._op = namespace, name, None

    def __call__(self):
        if self._op is None:
            self._op = getattr(getattr(torch.ops, self._namespace), self._name).default
        return self._op


class _CustomOp:
    """Calls torch.ops.<namespace>.<name>, whose schema takes the level shapes flattened; the other arguments
    (the plain op's or the fused op's: `per_point` tensors after value, then Python values) pass as given.
    `python`: an op defined in Python (call_python_op), not a C++ one."""

    def __init__(self, name: str, per_point: int, namespace: str = "rtdetrv2_kernels", python: bool = False):
        self._op, self._per_point, self._python = _LazyOp(namespace, name), per_point, python

    def __call__(self, value, spatial_shapes, *arguments):
        return self.with_levels(spatial_shapes)(value, *arguments)

    def with_levels(self, spatial_shapes):
        """The call with the level shapes given, flattened once (what the call cache keeps)."""
        op, per_point = self._op(), self._per_point
        flat_shapes = [size for shape in spatial_shapes for size in shape]
        if not self._python:
            return lambda value, *arguments: op(value, flat_shapes, *arguments)

        def run(value, *arguments):
            return call_python_op(op, (value, *arguments[:per_point]), value, flat_shapes, *arguments)

        return run


def with_levels(run, spatial_shapes):
    """`run` (a backend's plain or fused entry) with its level shapes given: (value, *the other arguments)."""
    if isinstance(run, _CustomOp):
        return run.with_levels(spatial_shapes)
    return lambda value, *arguments: run(value, spatial_shapes, *arguments)


def _tensor_levels_op(namespace: str = "rtdetrv2_kernels"):
    """Calls torch.ops.<namespace>.ms_deform_attn_forward_tensor_levels with its arguments as given."""
    op = _LazyOp(namespace, "ms_deform_attn_forward_tensor_levels")
    return lambda *arguments: op()(*arguments)


def cuda_kernel_backend(name: str, namespace: str, device_types: tuple[str, ...] = (),
                        explicit_device_types: tuple[str, ...] = (), unavailable=lambda device_type: None) -> Backend:
    """A backend running the C++ ops of torch.ops.<namespace> with the CUDA kernels' limits (csrc/cuda/:
    kMaxLevels). The emulated CUDA builds of the test suite are made with this too."""
    return Backend(name, _CustomOp("ms_deform_attn_forward", PLAIN_PER_POINT, namespace),
                   _CustomOp("ms_deform_attn_fused_forward", FUSED_PER_POINT, namespace), _tensor_levels_op(namespace),
                   device_types, deterministic=True, explicit_device_types=explicit_device_types, max_levels=16,
                   unavailable=unavailable)


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


def _cuda_unavailable(device_type: str) -> str | None:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    reason = _extension.load("_C_cuda")
    if reason is not None:
        return f"the CUDA kernels could not be loaded ({reason})"
    return _gpu_mismatch_reason(_extension.cuda_archs())


def _cpu_unavailable(device_type: str) -> str | None:
    reason = _extension.load("_C")
    return None if reason is None else f"the C++ kernels could not be loaded ({reason})"


def _triton_unavailable(device_type: str) -> str | None:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "it runs on CUDA tensors (or on CPU tensors in Triton's interpreter, TRITON_INTERPRET=1)"
    try:
        from . import triton_ms_deform_attn  # noqa: F401
    except ImportError as error:
        return f"Triton could not be imported ({error})"
    return None


# Fastest first: automatic selection takes the first that can run the call. "cpu" and "cuda" are the same
# C++ ops; the dispatcher picks the kernel by the tensors' device. The C++ and Triton kernels compute the fused
# op's softmax and locations themselves; the reference uses PyTorch ops.
_REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        cuda_kernel_backend("cuda", "rtdetrv2_kernels", device_types=("cuda",), unavailable=_cuda_unavailable),
        Backend("triton", _CustomOp("triton_ms_deform_attn_forward", PLAIN_PER_POINT, python=True),
                _CustomOp("triton_ms_deform_attn_fused_forward", FUSED_PER_POINT, python=True),
                None, device_types=("cuda",), explicit_device_types=("cpu",), unavailable=_triton_unavailable,
                deterministic=False),  # atomics; under use_deterministic_algorithms its backward alerts
        Backend("cpu", _CustomOp("ms_deform_attn_forward", PLAIN_PER_POINT),
                _CustomOp("ms_deform_attn_fused_forward", FUSED_PER_POINT),
                _tensor_levels_op(), device_types=("cpu",), unavailable=_cpu_unavailable, deterministic=True),
        # grid_sample's CUDA backward adds with atomics (PyTorch alerts under use_deterministic_algorithms).
        Backend("torch", ms_deform_attn_reference, ms_deform_attn_fused_reference, None, device_types=(ANY_DEVICE,),
                deterministic=False),
    )
}
BACKENDS = tuple(_REGISTRY)  # the public backends, fastest first


def register_backend(backend: Backend) -> None:
    """Adds `backend` (after the public ones in priority). Only the test suite adds any (the CUDA kernels
    emulated on the CPU, tests/emulated_cuda/); users never see them in available_backends()."""
    global _RESOLVED
    _REGISTRY[backend.name] = backend
    _RESOLVED = {}  # a new dict, so that caches checked against resolution_cache() see the change


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}") from None


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None when `backend` can run on tensors of `device_type` here (for some input), else why it cannot."""
    return get(backend).unavailable_reason(device_type)


def available_backends() -> list[str]:
    """The backends that can run here, on the CPU or on this machine's GPU, fastest first."""
    device_types = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    return [b for b in BACKENDS if any(unavailable_reason(b, d) is None for d in device_types)]


@functools.cache
def _warn_fallback(device_type: str, skipped: str) -> None:
    warnings.warn(f"rtdetrv2_kernels: falling back to the slow 'torch' backend on {device_type}: {skipped}", stacklevel=4)


# What each (backend argument, call, environment variable) resolved to: availability does not change within a
# process, and eager calls then skip the lookups (a few microseconds each call).
_RESOLVED: dict[tuple[str | None, Call, str | None], str] = {}


def resolution_cache() -> dict:
    """The current cache of resolve_backend: replaced, not emptied, whenever what it remembers may be stale."""
    return _RESOLVED


# torch.compile runs this once per set of arguments while tracing and bakes in the answer, so the environment
# lookup and the first-use library load stay out of the compiled graph.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str | None, device_type: str, dtype: torch.dtype, num_levels: int) -> str:
    """The name of the backend that runs a call on `device_type` tensors of `dtype` with `num_levels` levels."""
    call = Call(device_type, dtype, num_levels)
    key = (backend, call, os.environ.get(ENV_VAR))
    resolved = _RESOLVED.get(key)
    if resolved is None:
        resolved = _RESOLVED[key] = _resolve(backend, call)
    return resolved


def _resolve(backend: str | None, call: Call) -> str:
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"{ENV_VAR}={backend!r}"
    else:
        source = f"backend={backend!r}"
    if backend is not None:
        if backend not in _REGISTRY:
            raise ValueError(f"{source}: backend must be one of {BACKENDS} or None")
        reasons = _REGISTRY[backend].not_supported_reasons(call)
        if reasons:
            raise RuntimeError(f"{source} is not available: {'; '.join(reasons)}")
        return backend
    skipped = []
    for candidate in _REGISTRY.values():
        if not candidate.chosen_automatically_on(call.device_type):
            continue
        reasons = candidate.not_supported_reasons(call)
        if not reasons:
            if skipped and candidate.name == "torch":
                _warn_fallback(call.device_type, "; ".join(skipped))
            return candidate.name
        skipped.append(f"'{candidate.name}' cannot run it: {'; '.join(reasons)}")
    raise RuntimeError(f"no backend runs {call.device_type} tensors ({'; '.join(skipped) or 'none serves them'}); "
                       f"name one of {BACKENDS} that does")


# torch.onnx.export (either exporter) cannot translate the custom ops: while it traces, the reference, made of
# standard operators, runs in their place. torch.compile folds the check to False.
def _exported(reference):
    """The reference as an export writes it: bilinear sampling in the form export_options chose."""
    return functools.partial(reference, bilinear=export_bilinear())


def implementation(backend: str):
    """The function running the plain op on `backend`. The reference while torch.onnx.export traces
    (bilinear sampling as export_options says)."""
    if in_onnx_export():
        return _exported(ms_deform_attn_reference)
    return _REGISTRY[backend].plain


def fused_implementation(backend: str):
    """The function running ms_deform_attn_fused on `backend`. The reference while torch.onnx.export traces
    (bilinear sampling as export_options says)."""
    if in_onnx_export():
        return _exported(ms_deform_attn_fused_reference)
    return _REGISTRY[backend].fused


def tensor_levels_implementation(backend: str):
    """The function running the plain op on `backend` with the level table in tensors, or None where the
    backend has none (its caller then reads the table on the host). None while torch.onnx.export traces."""
    return None if in_onnx_export() else _REGISTRY[backend].tensor_levels
