"""python -m python_model COMMAND:

    predict   --weights PATH --image IMG [--out annotated.png] [--threshold 0.5] [--backend NAME]
    train     --data DIR --preset r18vd [--weights CKPT] --epochs N --batch-size B --out RUN_DIR [--resume CKPT]
              (or, instead of --data: --train-annotations JSON --train-images DIR, and --val-... the same)
    eval      --weights CKPT --data DIR [--split val]   (or --annotations JSON --images DIR)
    synthetic DIR [--train 300 --val 60 --size 128]   (a small dataset of shapes, for trying training out)
    export    --weights PATH --out model.onnx [--method default|discrete] [--bilinear gather|grid_sample]
              [--dynamic-batch] [--opset N] [--half] [--postprocess]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from rtdetrv2_kernels import BACKENDS

from .config import PRESETS


_LAYOUTS = ("train/ and val/, each with its images and an instances.json; COCO's layout "
            "(annotations/instances_train2017.json with train2017/, ...); or Roboflow's COCO export (train/, valid/, "
            "test/, each with its images and a _annotations.coco.json)")


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

    train = commands.add_parser("train", help="train or fine-tune on COCO-format data")
    train.add_argument("--data", help=f"a dataset directory: {_LAYOUTS}. Not needed where a split's files are "
                       "given by the arguments below")
    for split in ("train", "val"):
        train.add_argument(f"--{split}-annotations", metavar="JSON",
                           help=f"the {split} split's COCO instances file, instead of finding it under --data")
        train.add_argument(f"--{split}-images", metavar="DIR", help=f"the directory of the {split} split's images")
    train.add_argument("--preset", default="r18vd", choices=sorted(PRESETS), help="the architecture and its recipe")
    train.add_argument("--weights", help="start from these weights (transformers directory / Hub id, or a .pth); "
                       "class heads of another class count are replaced")
    train.add_argument("--resume", help="continue a run from its last.pth")
    train.add_argument("--epochs", type=int, help="default: the preset's recipe")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--image-size", type=int, default=640, help="training and evaluation side (default 640)")
    train.add_argument("--amp", choices=["bf16", "fp16"], help="automatic mixed precision")
    train.add_argument("--workers", type=int, default=2, help="data loading processes (default 2)")
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--no-eval", action="store_true", help="skip the COCO evaluation after each epoch")
    train.add_argument("--out", required=True, help="run directory: last.pth (every epoch), best.pth (the best AP "
                       "so far) and log.jsonl")
    train.add_argument("--device", help="torch device (default: cuda if available)")
    train.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                       help="change a model configuration field, e.g. --set hidden_dim=128 (repeatable)")
    train.add_argument("--recipe", action="append", default=[], metavar="FIELD=JSON",
                       help="change a training recipe field (python_model.train.Recipe), e.g. --recipe lr=4e-4")

    evaluate = commands.add_parser("eval", help="COCO box metrics on a dataset split")
    evaluate.add_argument("--weights", required=True, help="a checkpoint of `train`, a transformers directory, "
                          "or an original .pth (with --preset)")
    evaluate.add_argument("--preset", choices=sorted(PRESETS), help="the architecture of an original .pth")
    evaluate.add_argument("--data", help=f"a dataset directory: {_LAYOUTS}")
    evaluate.add_argument("--split", default="val", help="the split of --data to evaluate on (default val)")
    evaluate.add_argument("--annotations", metavar="JSON", help="a COCO instances file, instead of --data")
    evaluate.add_argument("--images", metavar="DIR", help="the directory of its images")
    evaluate.add_argument("--image-size", type=int, help="default: the model's eval_spatial_size")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default="cpu")

    export = commands.add_parser("export", help="write the deployed detector as an ONNX graph and check it")
    export.add_argument("--weights", required=True, help="as for predict")
    export.add_argument("--preset", choices=sorted(PRESETS), help="the architecture of an original .pth checkpoint")
    export.add_argument("--out", required=True, help="the .onnx file to write")
    export.add_argument("--method", choices=["default", "discrete"],
                        help="the decoder's sampling (default: the checkpoint's; discrete = RT-DETRv2's deployment form)")
    export.add_argument("--bilinear", choices=["gather", "grid_sample"], default="gather",
                        help="how bilinear sampling is written: corner gathers (default; for TensorRT and NPU "
                        "toolchains) or GridSample nodes")
    export.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: fixed at --batch)")
    export.add_argument("--batch", type=int, default=1, help="the batch size of the graph, or of the sample input")
    export.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's; 17 for older runtimes)")
    export.add_argument("--half", action="store_true", help="float16 weights and input")
    export.add_argument("--postprocess", action="store_true",
                        help="top-k detections inside the graph: inputs images and image_sizes, outputs scores, "
                        "labels and boxes in pixels")
    export.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="input size (default: the model's eval_spatial_size)")
    export.add_argument("--no-check", action="store_true", help="skip running the written graph in onnxruntime")

    synthetic = commands.add_parser("synthetic", help="write a small synthetic COCO-format dataset")
    synthetic.add_argument("out", help="directory to create (train/ and val/)")
    synthetic.add_argument("--train", type=int, default=300, help="training images (default 300)")
    synthetic.add_argument("--val", type=int, default=60, help="validation images (default 60)")
    synthetic.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    synthetic.add_argument("--seed", type=int, default=0)
    return parser


def _check_data(parser: argparse.ArgumentParser, args) -> None:
    """argparse errors unless every split the command reads has --data or both of its explicit arguments."""
    if args.command == "train":
        prefixes = ["train-"] + ([] if args.no_eval else ["val-"])
    elif args.command == "eval":
        prefixes = [""]
    else:
        return
    for prefix in prefixes:
        dest = prefix.replace("-", "_")
        annotations, images = getattr(args, f"{dest}annotations"), getattr(args, f"{dest}images")
        if bool(annotations) != bool(images):
            parser.error(f"--{prefix}annotations and --{prefix}images go together: give both or neither")
        if not annotations and not args.data:
            parser.error(f"give --data, or --{prefix}annotations with --{prefix}images"
                         f"{' (or --no-eval)' if prefix == 'val-' else ''}")


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


def _field(assignment: str) -> tuple[str, object]:
    name, _, value = assignment.partition("=")
    if not value:
        raise ValueError(f"--set {assignment!r}: expected FIELD=VALUE (VALUE in JSON, e.g. hidden_dim=128)")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value  # a bare string, e.g. --set cross_attn_method=discrete


def train(args) -> int:
    from .train import TrainSettings, train as run

    settings = TrainSettings(data=args.data, out=args.out, train_annotations=args.train_annotations,
                             train_images=args.train_images, val_annotations=args.val_annotations,
                             val_images=args.val_images, preset=args.preset, weights=args.weights,
                             resume=args.resume, epochs=args.epochs, batch_size=args.batch_size,
                             image_size=args.image_size, amp=args.amp, device=args.device, workers=args.workers,
                             evaluate_every_epoch=not args.no_eval, max_steps=args.max_steps,
                             model_overrides=dict(_field(a) for a in args.set),
                             recipe_overrides=dict(_field(a) for a in args.recipe))
    result = run(settings)
    print(f"last checkpoint: {result['checkpoint']}")
    return 0


def evaluate(args) -> int:
    from .data import CocoDetection, EvalTransforms
    from .evaluate import evaluate as run, format_metrics
    from .model import load_pretrained
    from .train import find_split

    model = load_pretrained(args.weights, preset=args.preset).to(args.device)
    size = [args.image_size] * 2 if args.image_size else model.config.eval_spatial_size
    images, annotations = (args.images, args.annotations) if args.annotations else find_split(args.data, args.split)
    dataset = CocoDetection(images, annotations, EvalTransforms(size))
    print(format_metrics(run(model, dataset, args.batch_size, torch.device(args.device))))
    return 0


def export(args) -> int:
    from .export import DeployedDetector, compare, export_onnx, graph_operators
    from .model import load_pretrained

    overrides = {} if args.method is None else {"cross_attn_method": args.method}
    if args.image_size:
        overrides["eval_spatial_size"] = list(args.image_size)
    model = load_pretrained(args.weights, preset=args.preset, **overrides).deploy()
    detector = DeployedDetector(model, postprocess=args.postprocess)  # float32: what the graph is checked against
    exported = DeployedDetector(copy.deepcopy(model).half(), args.postprocess) if args.half else detector
    config = model.config
    print(f"exporting {args.weights}: {config.cross_attn_method} sampling"
          f"{'' if config.cross_attn_method == 'discrete' else f' written as {args.bilinear}'}, input "
          f"{'B' if args.dynamic_batch else args.batch}x3x{config.eval_spatial_size[0]}x{config.eval_spatial_size[1]}"
          f" {'float16' if args.half else 'float32'}, opset {args.opset or 'default'}")
    try:
        path = export_onnx(exported, args.out, bilinear=args.bilinear, dynamic_batch=args.dynamic_batch,
                           opset=args.opset, batch=args.batch)
    except Exception as error:  # the exporters' own errors (an operator without a form at this opset, ...)
        message = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        print(f"error: the export failed: {type(error).__name__}: {message}", file=sys.stderr)
        return 1
    operators = graph_operators(path)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB; GridSample {'present' if 'GridSample' in operators else 'absent'}): "
          f"inputs {', '.join(detector.input_names())}; outputs {', '.join(detector.output_names())}")
    if args.no_check:
        return 0
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("not checked: onnxruntime is not installed (pip install onnxruntime)", file=sys.stderr)
        return 0
    batches = [args.batch, args.batch + 1] if args.dynamic_batch else [args.batch]
    tolerance = 1e-2 if args.half else 1e-4
    worst = 0.0
    for batch in batches:
        comparison = compare(path, detector, "onnxruntime", batch=batch)
        print(f"check against the PyTorch model (float32): {comparison.describe()}")
        if comparison.worst() > tolerance:
            comparison = compare(path, detector, "onnxruntime", batch=batch, any_query_order=True)
            print(f"  in another query order (near-tied query scores, as with untrained weights): "
                  f"{comparison.describe()}")
        worst = max(worst, comparison.worst())
    if worst > tolerance:
        print(f"error: the graph differs from the PyTorch model by {worst:.2e} (relative), more than {tolerance:g}",
              file=sys.stderr)
        return 1
    return 0


def synthetic(args) -> int:
    from .synthetic import write_dataset

    write_dataset(args.out, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} training and {args.val} validation images to {args.out}")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_data(parser, args)
    try:
        commands = {"predict": predict, "train": train, "eval": evaluate, "synthetic": synthetic, "export": export}
        return commands[args.command](args)
    except (OSError, ValueError) as error:  # unreadable files, checkpoints that do not fit: one clear line
        print(f"error: {error}", file=sys.stderr)
        return 2
