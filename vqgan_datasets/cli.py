"""The `vqgan-datasets` command: parses arguments and calls one `jobs` function per command."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("vqgan_datasets")

MODEL_HELP = "Hub id or local model directory (default: flax-community/vqgan_f16_16384)"

EXIT_OK = 0
EXIT_ERROR = 1  # the command stopped: one line on stderr (the traceback with --debug)
EXIT_USAGE = 2  # argparse: bad arguments
EXIT_INCOMPLETE = 3  # finished, but some work units failed: the summary says which
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_TERMINATED = 143  # SIGTERM: docker stop, Kubernetes, SLURM, timeout

EXIT_STATUS = """\
exit status:
  0    done: every work unit finished (samples skipped or kept as nulls under
       --on-error skip/null are counted in the summary, and are not failures)
  1    error: the command stopped (one line on stderr; the traceback with --debug)
  2    bad arguments, or an output that would overwrite an input
  3    incomplete: the summary was printed, but some shards failed or were damaged
       ("shards_failed", "failed_shards"); rerunning the same command retries them
       (verify: some shards are damaged)
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM): work stops, finished shards stay,
       the manifest and summary are written, a rerun goes on from there"""

ENCODE_EXIT_STATUS = EXIT_STATUS + """

With tar shard input each shard is a work unit: an unreadable or damaged shard, or one
holding a bad image under --on-error raise (the default), fails while the others go on, and
the command exits 3. With datasets input (one unit) a bad image under --on-error raise stops
the command (exit 1); under skip or null it is counted ("skipped", "nulls") and the exit
status is 0."""


def _at_least(low: int):
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from err
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


POSITIVE, NON_NEGATIVE = _at_least(1), _at_least(0)


def _gpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], formatter_class=_Formatter, **kwargs)

    demo = command(
        "demo", help="the offline quickstart: tokenize the sample photos with the demo model",
        description="Tokenize the six sample photos installed with the package, using the "
        "small demo model installed with it, into OUTPUT/tokens (a datasets directory), decode "
        "them into OUTPUT/decoded and draw OUTPUT/preview.png. Needs no network.",
    )
    demo.add_argument("output", help="output directory")
    demo.add_argument("--model", help="model directory (default: the installed demo model)")
    demo.add_argument("--images", help="image folder (default: the installed sample photos)")

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
    encode.add_argument("--image-size", type=POSITIVE, help="default: the model's resolution")
    encode.add_argument("--batch-size", type=POSITIVE,
                        help="per device (default: the engine's choice for the devices)")
    encode.add_argument("--on-error", choices=("raise", "skip", "null"), default="raise",
                        help="a bad image: raise (default; for shards, the shard fails and the "
                        "others go on), skip it, or keep a null row with the reason")
    encode.add_argument("--preprocess", default="exact",
                        choices=("exact", "fast", "lanczos_center_crop", "adm_center_crop",
                                 "opencv_linear_center_crop", "torchvision_bilinear_center_crop"),
                        help="exact (default: the model family's own preprocessing, the same "
                        "for every input form), fast (DCT-scaled JPEG decode), or a family's "
                        "preprocessing by name")
    encode.add_argument("--workers", type=NON_NEGATIVE, metavar="N",
                        help="image preprocessing processes (default: from the cores; 0: "
                        "threads in this process)")
    encode.add_argument("--value-range", type=_value_range,
                        help="override the checkpoint's pixel range, e.g. 0,1 for dalle-mini tokens")
    encode.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    encode.add_argument("--keep-image", action="store_true", help="keep the images next to tokens")
    encode.add_argument("--overwrite", action="store_true",
                        help="tar shard output: convert every shard again, also those an earlier "
                        "run finished (with other settings or another model, too)")
    encode.add_argument("--verify", action="store_true",
                        help="tar shard output: check the sha256 of every shard an earlier run "
                        "finished (always checked: sizes; hashes of local shards up to 64 MiB)")
    scale = encode.add_argument_group("beyond one machine (tar shard input)")
    scale.add_argument("--ray", metavar="ADDRESS", nargs="?", const="",
                       help="convert shards on a Ray cluster (no ADDRESS: a local Ray)")
    scale.add_argument("--num-actors", type=POSITIVE, help="Ray actors (default: one per GPU or CPU)")
    scale.add_argument("--gpus-per-actor", type=_gpus, default=0)
    scale.add_argument("--multihost", choices=("auto",),
                       help="JAX multi-host run detected from the environment (TPU pods, SLURM)")
    scale.add_argument("--coordinator", metavar="HOST:PORT",
                       help="JAX multi-host coordinator address (with --num-processes/--process-id)")
    scale.add_argument("--num-processes", type=POSITIVE)
    scale.add_argument("--process-id", type=NON_NEGATIVE)

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
    decode.add_argument("--batch-size", type=POSITIVE, help="per device")
    decode.add_argument("--format", default="png", choices=("png", "jpg", "webp"))
    decode.add_argument("--limit", type=NON_NEGATIVE, help="decode only the first N rows")
    decode.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="tokens that cannot be decoded (wrong length, ids outside the "
                        "codebook): raise (default; stops, naming the row) or skip them (counted "
                        "in the summary). Null rows (images encode could not read) are always "
                        "skipped and counted as \"nulls\"")

    preview = command("preview", help="a PNG grid: originals above reconstructions")
    preview.add_argument("input", help="images: a folder, datasets directory, parquet, ...")
    preview.add_argument("output", help="the PNG file to write")
    preview.add_argument("--model", help=MODEL_HELP)
    preview.add_argument("-n", "--count", type=POSITIVE, default=8, help="samples (default 8)")
    preview.add_argument("--columns", type=POSITIVE, help="samples per row")
    preview.add_argument("--image-size", type=POSITIVE)

    report = command(
        "report", help="an HTML quality report: previews, PSNR, codebook usage, throughput",
    )
    report.add_argument("input", help="images (as for preview) or a token dataset directory")
    report.add_argument("output", help="output directory (report.html and its PNGs)")
    report.add_argument("--model", help=MODEL_HELP)
    report.add_argument("--max-samples", type=POSITIVE, default=64)
    report.add_argument("--image-size", type=POSITIVE)

    convert = command(
        "convert", help="a published tokenizer checkpoint → a model directory",
        description="CHECKPOINT: a .pt, .pth, .bin, .ckpt or .safetensors file of a taming "
        "VQGAN, LlamaGen VQ, IBQ, MaskGIT VQGAN or Open-MAGVIT2. The family is detected from the file "
        "(tensor names, saved hyper-parameters) unless --family is given; IBQ files have "
        "taming's tensor names, so a bare IBQ state dict needs --family ibq. Loads the "
        "checkpoint weights-only (nothing in the file runs) unless --unsafe-pickle is given.",
    )
    convert.add_argument("checkpoint")
    convert.add_argument("output")
    convert.add_argument("--family", help="taming, llamagen, ibq, maskgit or open_magvit2 (default: detected)")
    convert.add_argument("--config", metavar="YAML", help="the family's model yaml (default: read "
                         "the architecture off the weights)")
    convert.add_argument("--value-range", type=_value_range, default=None,
                         help="the range the checkpoint was trained with (default: the family's; "
                         "-1,1 except MaskGIT's 0,1)")
    convert.add_argument("--unsafe-pickle", action="store_true",
                         help="fully unpickle (runs code from the file): trusted files only")

    info = command("info", help="model, config, value range, dtype and devices")
    info.add_argument("--model", help=MODEL_HELP)

    verify = command(
        "verify", help="check a token shard output against its stats files",
        description="Checks every shard of OUTPUT (a folder written by `encode` from tar shards) "
        "against the size and sha256 recorded in its stats file, and that every shard its "
        "manifest lists as done is there. Exits 3 naming each bad shard (a rerun of the encode "
        "command redoes them), 0 when all are good.", epilog=EXIT_STATUS,
    )
    verify.add_argument("output")

    push = command(
        "push", help="token outputs → a Hub dataset repo (resumable)",
        description="Uploads SOURCE (a token datasets directory written by encode, or a folder of "
        "token shards) to the Hub dataset repo ORG/NAME, created if missing: a dataset as parquet "
        "files, shards as they are, and a README.md card recording the tokenizer. Files go up in "
        "several commits; after an interruption, the same command sends only what the repo lacks. "
        "Needs a token with write access (`hf auth login`, or HF_TOKEN).",
    )
    push.add_argument("source", help="token datasets directory or token shard folder")
    push.add_argument("repo_id", metavar="ORG/NAME", help="the Hub dataset repo")
    push.add_argument("--dry-run", metavar="DIR", help="upload nothing: write the files that "
                      "would be uploaded into DIR (load_dataset(DIR) reads them back)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--max-shard-size", default="500MB",
                      help="parquet file size for a token dataset (default 500MB)")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


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
        from .jobs.demo import demo

        return demo(args.output, model=args.model, images=args.images, progress=progress)
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
            overwrite=args.overwrite, verify=args.verify,
        )
    if args.command == "decode":
        return jobs.decode(args.input, args.output, model=args.model,
                           token_column=args.token_column, batch_size=args.batch_size,
                           image_format=args.format, limit=args.limit,
                           on_error=args.on_error)
    if args.command == "preview":
        return str(jobs.preview(args.input, args.output, model=args.model, count=args.count,
                                image_size=args.image_size, columns=args.columns))
    if args.command == "report":
        return str(jobs.report(args.input, args.output, model=args.model,
                               max_samples=args.max_samples, image_size=args.image_size))
    if args.command == "convert":
        return str(jobs.convert(args.checkpoint, args.output, family=args.family,
                                config=args.config, value_range=args.value_range,
                                unsafe_pickle=args.unsafe_pickle))
    if args.command == "info":
        return jobs.info(args.model)
    if args.command == "verify":
        from .jobs.verify import verify_output

        return verify_output(args.output)
    if args.command == "push":
        from .jobs.push import push

        return push(args.source, args.repo_id, dry_run=args.dry_run, private=args.private,
                    max_shard_size=args.max_shard_size)
    raise AssertionError(args.command)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it stops as after Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    # The first SIGTERM stops the work; more while it cleans up must not cut that short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)
    try:  # values argparse cannot check alone: a usage error too
        if args.command == "encode":
            _encode_options(args)
        elif args.command == "decode":
            from .options import EncodeOptions

            EncodeOptions(output_field=args.token_column, batch_size=args.batch_size)
    except ValueError as err:
        print(f"vqgan-datasets {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    # The handler belongs to the program, not the library: installed for this call only.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    from .jobs.overlap import OutputIsInputError

    try:
        result = _run(args)
    except KeyboardInterrupt as err:
        return _interrupted(args, err)
    except Exception as err:  # noqa: BLE001 - one line for users, the traceback with --debug
        if args.debug:
            raise
        message = "; ".join(line.strip() for line in str(err).strip().splitlines())
        message = message or type(err).__name__
        print(f"vqgan-datasets {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, OutputIsInputError) else EXIT_ERROR
    try:
        print(result if isinstance(result, str) else json.dumps(result, indent=2, default=str))
    except BrokenPipeError:  # `vqgan-datasets info | head`
        sys.stderr.close()
    if isinstance(result, dict) and result.get("complete") is False:
        print(f"vqgan-datasets {args.command}: incomplete: {_incomplete(result)}",
              file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_OK


def _interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM: the summary of what was done (shard runs), one line, 130 or 143."""
    terminated = isinstance(err, _Terminated) or isinstance(err.__cause__, _Terminated)
    manifest = getattr(err, "manifest", None)
    where = ""
    if manifest is not None:
        from .jobs.commands import manifest_summary

        summary = manifest_summary(manifest) | {"interrupted": True}
        with contextlib.suppress(BrokenPipeError):
            print(json.dumps(summary, indent=2, default=str), flush=True)
        where = (f": {summary['shards']} of {summary['shards_total']} shards done (manifest "
                 f"{manifest.path}); rerun the same command to convert the rest")
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    print(f"vqgan-datasets {args.command}: {what}{where}", file=sys.stderr)
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def _incomplete(summary: dict[str, Any]) -> str:
    """One line on what failed, from a job's summary (the errors themselves are logged)."""
    if "bad_shards" in summary:  # verify
        names = ", ".join(s["output"] for s in summary["bad_shards"])
        return (f"{len(summary['bad_shards'])} of {summary['shards_total']} shards are bad "
                f"({names}); rerun the encode command to redo them")
    where = summary.get("manifest") or "the summary"
    return (f"{summary.get('shards_failed', '?')} of {summary.get('shards_total', '?')} shards "
            f"failed (listed in {where}); rerun the same command to retry them")


if __name__ == "__main__":
    sys.exit(main())
