"""Tokenize webdataset tar shards with a VQGAN, two ways.

1. Streaming: `wds.WebDataset(urls).compose(vqwds.encode(model))` adds a `vqgan.npy` token array
   to every sample as it goes by (for a training loop that wants tokens on the fly).
2. Shard to shard: `vqwds.tokenize_shards` writes one token shard per input shard, same keys,
   captions and json passed through, with a stats JSON per shard; rerun it after an interruption
   and it carries on where it stopped.

    python examples/tokenize_webdataset.py --model flax-community/vqgan_f16_16384 \
        --input 'shards/{00000..00003}.tar' --output out/
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys

import webdataset as wds

from vqgan_datasets import VQModel
from vqgan_datasets import wds as vqwds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hub id or local checkpoint directory")
    parser.add_argument("--input", required=True,
                        help="shard URLs: a brace pattern, local paths, pipe:, s3://, ...")
    parser.add_argument("--output", required=True,
                        help="output directory, or a pattern with {shard}")
    parser.add_argument("--image-size", type=int, default=None,
                        help="default: the model's resolution")
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--on-error", choices=("raise", "skip", "null"), default="skip")
    parser.add_argument("--keep-image", action="store_true", help="copy the images too")
    parser.add_argument("--preview", type=int, default=4,
                        help="samples to stream through the encode stage first (0: none)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def preview(model: VQModel, args: argparse.Namespace) -> None:
    """Stream the first few samples through the encode stage, as a training loop would."""
    stage = vqwds.encode(model, image_size=args.image_size, batch_size=args.batch_size,
                         on_error="skip", keep_image=False)
    dataset = wds.WebDataset(vqwds.expand_urls(args.input), shardshuffle=False).compose(stage)
    for sample in itertools.islice(iter(dataset), args.preview):
        tokens = sample["vqgan.npy"]
        caption = sample.get("txt", b"").decode("utf-8", "replace")[:60]
        print(f"{sample['__key__']}: {tokens.size} {tokens.dtype} tokens "
              f"{tokens[:8].tolist()}... caption {caption!r}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vqgan_datasets").setLevel(logging.INFO)  # the run's summary line
    model = VQModel.from_pretrained(args.model)
    if args.preview:
        preview(model, args)
    manifest = vqwds.tokenize_shards(
        args.input, args.output, model=model, image_size=args.image_size,
        batch_size=args.batch_size, on_error=args.on_error, keep_image=args.keep_image,
        progress=not args.no_progress,
    )
    totals = manifest.totals
    print(f"{len(manifest.written)} shards written, {len(manifest.finished)} already done, "
          f"{len(manifest.failed_shards)} failed; {totals['encoded']} of {totals['samples_in']} "
          f"samples encoded, {totals['skipped']} skipped; manifest: {manifest.path}")
    return 1 if manifest.failed_shards else 0


if __name__ == "__main__":
    sys.exit(main())
