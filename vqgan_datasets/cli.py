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

EXIT_OK = 0
EXIT_ERROR = 1  # the command stopped: one line on stderr (the traceback with --debug)
EXIT_USAGE = 2  # argparse: bad arguments
EXIT_INCOMPLETE = 3  # finished, but some work units failed: the summary says which
EXIT_INTERRUPTED = 130

EXIT_STATUS = """\
exit status:
  0    done: every work unit finished (samples skipped or kept as nulls under
       --on-error skip/null are counted in the summary, and are not failures)
  1    error: the command stopped (one line on stderr; the traceback with --debug)
  2    bad arguments
  3    incomplete: the summary was printed, but some shards failed or were damaged
       ("shards_failed", "failed_shards"); rerunning the same command retries them
  130  interrupted"""

ENCODE_EXIT_STATUS = EXIT_STATUS + """

With tar shard input each shard is a work unit: an unreadable or damaged shard, or one
holding a bad image under --on-error raise (the default), fails while the others go on, and
the command exits 3. With datasets input (one unit) a bad image under --on-error raise stops
the command (exit 1); under skip or null it is counted ("skipped", "nulls") and the exit
status is 0."""


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


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions as usual; keeps text with line breaks (the exit status table) as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """--debug/--quiet, accepted before the command and after it (a command's copies default
    to SUPPRESS, so that they never reset a value given before the command)."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", default=default,
                        help="no progress bars, warnings only")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqgan-datasets",
        description="Tokenize image datasets with a VQGAN on every local device, and back.",
        epilog=EXIT_STATUS, formatter_class=_Formatter,
    )
    _global_options(parser, False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], formatter_class=_Formatter, **kwargs)

    demo = command(
        "demo", help="the offline quickstart: tokenize the sample photos with the demo model",
        description="Tokenize examples/images with model/demo into OUTPUT/tokens (a datasets "
        "directory), decode them into OUTPUT/decoded and draw OUTPUT/preview.png.",
    )
    demo.add_argument("output", help="output directory")
    demo.add_argument("--model", help="model directory (default: the bundled model/demo)")
    demo.add_argument("--images", help="image folder (default: the bundled examples/images)")

    encode = command(
        "encode", help="images → tokens (datasets directory, or token shards for tar input)",
        description="INPUT: an image folder, a datasets directory (save_to_disk), parquet files "
        "or a folder of them, imagefolder:DIR, or webdataset tar shards (a brace pattern, "
        "paths, pipe:, fsspec URLs). OUTPUT: a datasets directory, or a shard directory.",
        epilog=ENCODE_EXIT_STATUS,
    )
    encode.add_argument("input")
    encode.add_argument("output")
    encode.add_argument("--model", help=MODEL_HELP)
    encode.add_argument("--image-column", metavar="NAME",
                        help="the image column (default: image), or for tar shards the image "
                        "field(s), e.g. 'jpg;png' (default: the usual image extensions)")
    encode.add_argument("--image-size", type=int, help="default: the model's resolution")
    encode.add_argument("--batch-size", type=int,
                        help="per device (default: the engine's choice for the devices)")
    encode.add_argument("--on-error", choices=("raise", "skip", "null"), default="raise",
                        help="a bad image: raise (default; for shards, the shard fails and the "
                        "others go on), skip it, or keep a null row with the reason")
    encode.add_argument("--preprocess", choices=("exact", "fast"), default="exact",
                        help="exact (default: the seed's pixels for every input form) or fast "
                        "(DCT-scaled JPEG decode)")
    encode.add_argument("--workers", type=int, metavar="N",
                        help="image preprocessing processes (default: from the cores; 0: "
                        "threads in this process)")
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

    decode = command(
        "decode", help="tokens → image files",
        description="INPUT: a token dataset (a datasets directory written by `encode`, "
        "parquet files, a Hub layout directory) or token tar shards (a folder of them, a brace "
        "pattern, paths). The model is the one recorded with the tokens (for shards: each "
        "NAME.stats.json, or the folder's manifest.json) unless --model is given. OUTPUT: a "
        "folder of images named after their rows' file_name/key, made safe and unique (a short "
        "hash is added to a name that is taken, or too long).",
    )
    decode.add_argument("input")
    decode.add_argument("output")
    decode.add_argument("--model", help="default: the model recorded with the tokens; "
                        "given, it must be the one that made them")
    decode.add_argument("--token-column", help="default: the recorded token column; for "
                        "token shards, the tokens' field (default: vqgan.npy)")
    decode.add_argument("--batch-size", type=int, help="per device")
    decode.add_argument("--format", default="png", choices=("png", "jpg", "webp"))
    decode.add_argument("--limit", type=int, help="decode only the first N")

    preview = command("preview", help="a PNG grid: originals above reconstructions")
    preview.add_argument("input", help="images: a folder, datasets directory, parquet, ...")
    preview.add_argument("output", help="the PNG file to write")
    preview.add_argument("--model", help=MODEL_HELP)
    preview.add_argument("-n", "--count", type=int, default=8, help="samples (default 8)")
    preview.add_argument("--columns", type=int, help="samples per row")
    preview.add_argument("--image-size", type=int)

    report = command(
        "report", help="an HTML quality report: previews, PSNR, codebook usage, throughput",
    )
    report.add_argument("input", help="images (as for preview) or a token dataset directory")
    report.add_argument("output", help="output directory (report.html and its PNGs)")
    report.add_argument("--model", help=MODEL_HELP)
    report.add_argument("--max-samples", type=int, default=64)
    report.add_argument("--image-size", type=int)

    convert = command(
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

    info = command("info", help="model, config, value range, dtype and devices")
    info.add_argument("--model", help=MODEL_HELP)
    return parser


def _encode_options(args: argparse.Namespace):
    """The encode command's EncodeOptions (validated here, before any model is loaded)."""
    from .options import EncodeOptions

    return EncodeOptions(image_field=args.image_column, image_size=args.image_size,
                         batch_size=args.batch_size, on_error=args.on_error,
                         preprocess=args.preprocess, workers=args.workers,
                         keep_image=args.keep_image)


def _run(args: argparse.Namespace) -> Any:
    from .jobs import commands as jobs

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
            args.input, args.output, model=args.model, options=_encode_options(args),
            value_range=args.value_range, dtype=args.dtype, progress=progress,
            ray_address=args.ray, num_actors=args.num_actors,
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
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - one line for users, the traceback with --debug
        if args.debug:
            raise
        message = "; ".join(line.strip() for line in str(err).strip().splitlines())
        message = message or type(err).__name__
        print(f"vqgan-datasets {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    try:
        print(result if isinstance(result, str) else json.dumps(result, indent=2, default=str))
    except BrokenPipeError:  # `vqgan-datasets info | head`
        sys.stderr.close()
    if isinstance(result, dict) and result.get("complete") is False:
        print(f"vqgan-datasets {args.command}: incomplete: {_incomplete(result)}",
              file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_OK


def _incomplete(summary: dict[str, Any]) -> str:
    """One line on what failed, from a job's summary (the errors themselves are logged)."""
    where = summary.get("manifest") or "the summary"
    return (f"{summary.get('shards_failed', '?')} of {summary.get('shards_total', '?')} shards "
            f"failed (listed in {where}); rerun the same command to retry them")


if __name__ == "__main__":
    sys.exit(main())
