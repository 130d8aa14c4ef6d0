"""The eager fast path of the public ops: a call with the signature of an earlier call that passed every check
skips the checks and the backend lookup (docs/semantics.md, "The cost of a call").

The checks (_validation.py) and backend selection (backends.py) read only a call's signature: each tensor's
type, layout, shape, dtype and device, the level shapes and point counts, the method, the backend argument and
the RTDETRV2_KERNELS_BACKEND variable. A call whose signature matches one that passed would pass again, so it
is safe to skip them; bad input never has a remembered signature and still meets the full checks and their
messages. Signatures are built only from exact types (torch.Tensor, int, list, tuple, str): anything else (a
spatial_shapes tensor, NumPy ints, tensor subclasses) takes the full path every time, as do calls whose
tensors differ in dtype (their fate depends on autocast) and calls while torch.compile, torch.export or
torch.onnx.export trace. What is remembered is the outcome: the point counts and the chosen backend's entry
with the level shapes already in the form it takes (flattened, for the C++ ops).
"""

from __future__ import annotations

import os

import torch

from . import backends

# os.environ.get encodes the name and decodes the value on every call (half a microsecond); the key only
# needs the raw value. Where os.environ has no _data (not CPython), it is called.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(backends.ENV_VAR) if _ENVIRON_DATA is not None else None
_MAX_ENTRIES = 1024  # a model makes a handful; a program sweeping shapes must not grow it without bound
_SIGNATURES: dict[tuple, tuple] = {}


def signature(op: str, tensors: tuple, spatial_shapes, num_points, method, backend) -> tuple | None:
    """The key of a call of `op` ("plain" or "fused"), or None when it cannot have one. Written out flat: it
    runs on every call. None while torch.onnx.export traces: what a cached call runs was chosen for eager
    calls, and an export runs the reference instead (backends.implementation)."""
    if type(method) is not str or (backend is not None and type(backend) is not str) or backends.in_onnx_export():
        return None
    if type(spatial_shapes) is not list and type(spatial_shapes) is not tuple:
        return None
    levels = []
    for pair in spatial_shapes:
        if (type(pair) is not tuple and type(pair) is not list) or len(pair) != 2:
            return None
        height, width = pair
        if type(height) is not int or type(width) is not int:  # not bool, float or a NumPy int
            return None
        levels += pair
    if type(num_points) is not int:
        if type(num_points) is not list and type(num_points) is not tuple:
            return None
        for count in num_points:
            if type(count) is not int:
                return None
        num_points = tuple(num_points)
    environment = _ENVIRON_DATA.get(_ENV_KEY) if _ENVIRON_DATA is not None else os.environ.get(backends.ENV_VAR)
    dtype = tensors[0].dtype if type(tensors[0]) is torch.Tensor else None
    key = [op, tuple(levels), num_points, method, backend, environment, dtype]
    for tensor in tensors:
        if type(tensor) is not torch.Tensor or tensor.dtype is not dtype:
            return None
        key += (tensor.shape, tensor.device, tensor.layout)
    return tuple(key)


def lookup(key: tuple | None):
    """What remember() stored for `key`, or None. Entries stored before backends' resolution cache was last
    renewed (a backend registered) are stale: the backend they name was chosen from another registry."""
    if key is None:
        return None
    entry = _SIGNATURES.get(key)
    if entry is None or entry[0] is not backends.resolution_cache():
        return None
    return entry[1]


def remember(key: tuple | None, checked) -> None:
    """Stores `checked` (what the full path derived: the point counts, and the chosen backend's entry with the
    level shapes given) for `key`."""
    if key is None:
        return
    if len(_SIGNATURES) >= _MAX_ENTRIES:
        _SIGNATURES.clear()
    _SIGNATURES[key] = (backends.resolution_cache(), checked)
