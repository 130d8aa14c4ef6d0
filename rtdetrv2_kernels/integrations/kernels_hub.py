"""This package as a Hugging Face ``kernels`` layer for ``MultiScaleDeformableAttention``, the layer of
transformers' Deformable DETR, RT-DETR (v1), Grounding DINO, MM Grounding DINO, OmDet-Turbo, LW-DETR, RF-DETR
and PP-DocLayout v2-v4 models.

    from kernels import Mode, kernelize, use_kernel_mapping
    from rtdetrv2_kernels.integrations import kernels_hub
    with use_kernel_mapping(kernels_hub.kernel_mapping(), inherit_mapping=False):
        model = kernelize(model, mode=Mode.INFERENCE, device="cuda")   # or TRAINING; or device="cpu"

    # transformers' loading (GPU devices only: its KernelConfig has no "cpu" key)
    model.set_use_kernels(True, kernels_hub.kernel_config())

The layer repository ships inside this package (``kernels_hub_layer/build/torch-universal``: one variant for
every torch, since the op chooses its backend per device), and loads without any download.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["LAYER_NAME", "DEVICES", "repository_path", "layer_repository", "kernel_mapping", "kernel_config"]

LAYER_NAME = "MultiScaleDeformableAttention"
DEVICES = ("cpu", "cuda")  # the device keys of kernel_mapping(): where the op's backends are tested


def repository_path() -> Path:
    """The layer repository's root (holding ``build/torch-universal``)."""
    return Path(__file__).resolve().parent / "kernels_hub_layer"


def layer_repository():
    """A ``kernels.LocalLayerRepository`` of the layer."""
    from kernels import LocalLayerRepository

    return LocalLayerRepository(repository_path(), layer_name=LAYER_NAME)


def kernel_mapping(devices=DEVICES) -> dict:
    """The mapping for ``kernels.use_kernel_mapping`` / ``register_kernel_mapping``: the layer on each device
    of `devices`, in every mode (inference, training, torch.compile)."""
    repository = layer_repository()
    return {LAYER_NAME: {device: repository for device in devices}}


def kernel_config(devices=("cuda",)):
    """A ``transformers.KernelConfig`` naming the layer by its local path, for ``model.set_use_kernels(True,
    config)`` or ``from_pretrained(..., use_kernels=True, kernel_config=config)``. transformers accepts GPU
    device keys only here (on the CPU, use kernel_mapping() with kernels.kernelize)."""
    from transformers import KernelConfig

    return KernelConfig({LAYER_NAME: {device: f"{repository_path()}:{LAYER_NAME}" for device in devices}},
                        use_local_kernel=True)
