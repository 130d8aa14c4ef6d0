"""How the ops are written into an exported graph (torch.onnx.export, either exporter).

While an ONNX export traces, the ops run as the PyTorch reference, made of standard operators (the custom
ops have no ONNX form). Bilinear sampling then becomes either index arithmetic and ``Gather`` of the four
corners with their weights (``"gather"``, the default) or one ``GridSample`` node per level
(``"grid_sample"``). docs/integrations.md ("Deployment export") says which runtimes need which.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

BILINEAR_FORMS = ("gather", "grid_sample")
DEFAULT_BILINEAR = "gather"  # no runtime known to get it wrong; GridSample has known-wrong ones (TensorRT)

_bilinear = contextvars.ContextVar("rtdetrv2_kernels_export_bilinear", default=DEFAULT_BILINEAR)


def check_bilinear(bilinear: str) -> str:
    if bilinear not in BILINEAR_FORMS:
        raise ValueError(f"bilinear must be one of {BILINEAR_FORMS}, got {bilinear!r}")
    return bilinear


@contextlib.contextmanager
def export_options(*, bilinear: str = DEFAULT_BILINEAR) -> Iterator[None]:
    """Chooses how exports made inside the ``with`` block write bilinear sampling (``method="default"``):

    - ``"gather"`` (the default): index arithmetic and ``Gather`` of the four corners, zero outside the level,
      as the op's contract says. No ``GridSample`` node: for TensorRT (whose GridSample gives wrong results
      in RT-DETR-family exports), older TensorRT and NPU toolchains without ``GridSample``.
    - ``"grid_sample"``: one ``GridSample`` per level (opset 16 and later), for runtimes that run it well.

    ``method="discrete"`` exports without ``GridSample`` either way. Calls outside an export are unaffected::

        with rtdetrv2_kernels.export_options(bilinear="grid_sample"):
            torch.onnx.export(model, (images,), "model.onnx")
    """
    token = _bilinear.set(check_bilinear(bilinear))
    try:
        yield
    finally:
        _bilinear.reset(token)


def export_bilinear() -> str:
    """The bilinear form that an export made now writes."""
    return _bilinear.get()
