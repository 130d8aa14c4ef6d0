"""RT-DETRv2 in plain PyTorch, with its decoder's deformable attention on rtdetrv2_kernels.

    from python_model import RTDETRv2
    model = RTDETRv2.from_pretrained("PekingU/rtdetr_v2_r18vd").eval()    # or a local directory / .pth
    detections = model.predict(pil_image, threshold=0.5)

docs/python_model.md describes the presets, the checkpoint formats and their key mappings, and the CLI.
"""

from .checkpoints import CheckpointError
from .config import PRESETS, RTDETRv2Config, preset
from .criterion import build_criterion
from .model import RTDETRv2, load_original_checkpoint, load_pretrained, load_transformers_model, preprocess

__all__ = [
    "RTDETRv2",
    "RTDETRv2Config",
    "PRESETS",
    "preset",
    "preprocess",
    "load_pretrained",
    "load_transformers_model",
    "load_original_checkpoint",
    "CheckpointError",
    "build_criterion",
]
