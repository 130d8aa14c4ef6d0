"""python -m python_model predict --weights PATH --image IMG [--out annotated.png] [--threshold 0.5] [--backend NAME]"""

from __future__ import annotations

import argparse
import sys

from rtdetrv2_kernels import BACKENDS

from .config import PRESETS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m python_model", description="RT-DETRv2 on rtdetrv2_kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="detect objects in an image")
    predict.add_argument("--weights", required=True,
                         help="a transformers model directory, a Hugging Face Hub id, or an original .pth (with --preset)")
    predict.add_argument("--preset", choices=sorted(PRESETS), help="the architecture of an original .pth checkpoint")
    predict.add_argument("--image", required=True, help="the image file")
    predict.add_argument("--out", help="write the image with the detections drawn on it here")
    predict.add_argument("--threshold", type=float, default=0.5, help="minimum score (default 0.5)")
    predict.add_argument("--backend", choices=BACKENDS, help="rtdetrv2_kernels backend (default: the fastest here)")
    predict.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return parser


def draw(image, detections, labels):
    from PIL import ImageDraw

    annotated = image.convert("RGB")
    canvas = ImageDraw.Draw(annotated)
    for score, label, box in zip(detections["scores"].tolist(), detections["labels"].tolist(),
                                 detections["boxes"].tolist()):
        canvas.rectangle(box, outline=(255, 64, 32), width=2)
        canvas.text((box[0] + 3, box[1] + 2), f"{labels[label]} {score:.2f}", fill=(255, 64, 32))
    return annotated


def predict(args) -> int:
    try:
        from PIL import Image
    except ImportError:
        print("error: the CLI reads images with Pillow: pip install 'rtdetrv2-kernels[model]'", file=sys.stderr)
        return 2

    from .model import load_pretrained

    model = load_pretrained(args.weights, preset=args.preset, attention_backend=args.backend).to(args.device).deploy()
    image = Image.open(args.image)
    detections = model.predict(image, threshold=args.threshold)[0]
    labels = model.config.labels
    print(f"{len(detections['scores'])} detections with score > {args.threshold} in {args.image} "
          f"({image.width}x{image.height}):")
    for score, label, box in zip(detections["scores"].tolist(), detections["labels"].tolist(),
                                 detections["boxes"].tolist()):
        print(f"  {labels[label]:<16} {score:.3f}  [{', '.join(f'{v:.1f}' for v in box)}]")
    if args.out:
        draw(image, detections, labels).save(args.out)
        print(f"annotated image written to {args.out}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return predict(args)
    except (OSError, ValueError) as error:  # unreadable files, checkpoints that do not fit: one clear line
        print(f"error: {error}", file=sys.stderr)
        return 2
