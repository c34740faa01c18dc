"""The `vqgan-datasets` command: parses arguments and calls one `jobs` function per command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("vqgan_datasets")

MODEL_HELP = "Hub id or local model directory (default: flax-community/vqgan_f16_16384)"


def _value_range(text: str) -> tuple[float, float]:
    parts = text.replace("[", "").replace("]", "").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH such as 0,1 or -1,1, got {text!r}")
    try:
        low, high = (float(p) for p in parts)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected two numbers, got {text!r}") from err
    if not low < high:
        raise argparse.ArgumentTypeError(f"expected LOW < HIGH, got {text!r}")
    return low, high


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqgan-datasets",
        description="Tokenize image datasets with a VQGAN on every local device, and back.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="the offline quickstart: tokenize the sample photos with the demo model",
        description="Tokenize examples/images with model/demo into OUTPUT/tokens (a datasets "
        "directory), decode them into OUTPUT/decoded and draw OUTPUT/preview.png.",
    )
    demo.add_argument("output", help="output directory")
    demo.add_argument("--model", help="model directory (default: the bundled model/demo)")
    demo.add_argument("--images", help="image folder (default: the bundled examples/images)")

    encode = commands.add_parser(
        "encode", help="images → tokens (datasets directory, or token shards for tar input)",
        description="INPUT: an image folder, a datasets directory (save_to_disk), parquet files "
        "or a folder of them, imagefolder:DIR, or webdataset tar shards (a brace pattern, "
        "paths, pipe:, fsspec URLs). OUTPUT: a datasets directory, or a shard directory.",
    )
    encode.add_argument("input")
    encode.add_argument("output")
    encode.add_argument("--model", help=MODEL_HELP)
    encode.add_argument("--image-column", default="image")
    encode.add_argument("--image-size", type=int, help="default: the model's resolution")
    encode.add_argument("--batch-size", type=int, default=8, help="per device (default 8)")
    encode.add_argument("--on-error", choices=("raise", "skip", "null"), default="skip")
    encode.add_argument("--value-range", type=_value_range,
                        help="override the checkpoint's pixel range, e.g. 0,1 for dalle-mini tokens")
    encode.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    encode.add_argument("--keep-image", action="store_true", help="keep the images next to tokens")
    scale = encode.add_argument_group("beyond one machine (tar shard input)")
    scale.add_argument("--ray", metavar="ADDRESS", nargs="?", const="",
                       help="convert shards on a Ray cluster (no ADDRESS: a local Ray)")
    scale.add_argument("--num-actors", type=int, help="Ray actors (default: one per GPU or CPU)")
    scale.add_argument("--gpus-per-actor", type=float, default=0)
    scale.add_argument("--multihost", choices=("auto",),
                       help="JAX multi-host run detected from the environment (TPU pods, SLURM)")
    scale.add_argument("--coordinator", metavar="HOST:PORT",
                       help="JAX multi-host coordinator address (with --num-processes/--process-id)")
    scale.add_argument("--num-processes", type=int)
    scale.add_argument("--process-id", type=int)

    decode = commands.add_parser(
        "decode", help="tokens → image files",
        description="INPUT: a token dataset directory written by `encode`, or token tar shards "
        "(then --model is required). OUTPUT: a folder of images named after their rows/keys.",
    )
    decode.add_argument("input")
    decode.add_argument("output")
    decode.add_argument("--model", help="default: the model recorded with the tokens")
    decode.add_argument("--token-column", help="default: the recorded token column")
    decode.add_argument("--batch-size", type=int, default=8, help="per device")
    decode.add_argument("--format", default="png", choices=("png", "jpg", "webp"))
    decode.add_argument("--limit", type=int, help="decode only the first N")

    preview = commands.add_parser("preview", help="a PNG grid: originals above reconstructions")
    preview.add_argument("input", help="images: a folder, datasets directory, parquet, ...")
    preview.add_argument("output", help="the PNG file to write")
    preview.add_argument("--model", help=MODEL_HELP)
    preview.add_argument("-n", "--count", type=int, default=8, help="samples (default 8)")
    preview.add_argument("--columns", type=int, help="samples per row")
    preview.add_argument("--image-size", type=int)

    report = commands.add_parser(
        "report", help="an HTML quality report: previews, PSNR, codebook usage, throughput",
    )
    report.add_argument("input", help="images (as for preview) or a token dataset directory")
    report.add_argument("output", help="output directory (report.html and its PNGs)")
    report.add_argument("--model", help=MODEL_HELP)
    report.add_argument("--max-samples", type=int, default=64)
    report.add_argument("--image-size", type=int)

    convert = commands.add_parser(
        "convert", help="a taming-transformers .ckpt → a model directory",
        description="Loads the checkpoint weights-only (nothing in the file runs) unless "
        "--unsafe-pickle is given.",
    )
    convert.add_argument("checkpoint")
    convert.add_argument("output")
    convert.add_argument("--config", help="taming yaml (default: read the architecture off the weights)")
    convert.add_argument("--value-range", type=_value_range, default=(-1.0, 1.0),
                         help="the range the checkpoint was trained with (taming: -1,1)")
    convert.add_argument("--unsafe-pickle", action="store_true",
                         help="fully unpickle (runs code from the file): trusted files only")

    info = commands.add_parser("info", help="model, config, value range, dtype and devices")
    info.add_argument("--model", help=MODEL_HELP)
    return parser


def _run(args: argparse.Namespace) -> Any:
    from . import jobs

    progress = not args.quiet
    if args.command == "demo":
        return jobs.demo(args.output, model=args.model, images=args.images, progress=progress)
    if args.command == "encode":
        multihost = None
        if args.coordinator or args.num_processes or args.process_id is not None:
            multihost = {"coordinator_address": args.coordinator,
                         "num_processes": args.num_processes, "process_id": args.process_id}
        elif args.multihost == "auto":
            multihost = {"auto": True}
        return jobs.encode(
            args.input, args.output, model=args.model, image_column=args.image_column,
            image_size=args.image_size, batch_size=args.batch_size, on_error=args.on_error,
            value_range=args.value_range, dtype=args.dtype, keep_image=args.keep_image,
            progress=progress, ray_address=args.ray, num_actors=args.num_actors,
            gpus_per_actor=args.gpus_per_actor, multihost=multihost,
        )
    if args.command == "decode":
        return jobs.decode(args.input, args.output, model=args.model,
                           token_column=args.token_column, batch_size=args.batch_size,
                           image_format=args.format, limit=args.limit)
    if args.command == "preview":
        return str(jobs.preview(args.input, args.output, model=args.model, count=args.count,
                                image_size=args.image_size, columns=args.columns))
    if args.command == "report":
        return str(jobs.report(args.input, args.output, model=args.model,
                               max_samples=args.max_samples, image_size=args.image_size))
    if args.command == "convert":
        return str(jobs.convert(args.checkpoint, args.output, config=args.config,
                                value_range=args.value_range, unsafe_pickle=args.unsafe_pickle))
    if args.command == "info":
        return jobs.info(args.model)
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)
    try:
        result = _run(args)
    except KeyboardInterrupt:
        print("vqgan-datasets: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line for users, the traceback with --debug
        if args.debug:
            raise
        message = "; ".join(line.strip() for line in str(err).strip().splitlines())
        message = message or type(err).__name__
        print(f"vqgan-datasets {args.command}: error: {message}", file=sys.stderr)
        return 1
    try:
        print(result if isinstance(result, str) else json.dumps(result, indent=2, default=str))
    except BrokenPipeError:  # `vqgan-datasets info | head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
