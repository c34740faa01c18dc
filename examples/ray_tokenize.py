"""Tokenize images on a Ray cluster with GPUs, two ways.

1. Shards (exactly once): webdataset tar shards in, token shards out, one shard per Ray task on a
   pool of GPU actors; a rerun after any failure carries on where it stopped.

    ray start --head                                  # on the head node
    ray start --address HEAD_IP:6379                  # on every GPU node
    python examples/ray_tokenize.py shards --address auto \
        --model flax-community/vqgan_f16_16384 \
        --input 's3://bucket/laion/{00000..09999}.tar' --output s3://bucket/laion-vqgan/ \
        --gpus-per-actor 1

2. Any Ray Dataset (at-least-once): image files → RayTokenizer in map_batches → Parquet. Ray's
   writers append and Ray retries failed tasks: write to a new directory each time.

    python examples/ray_tokenize.py images --address auto --model flax-community/vqgan_f16_16384 \
        --input s3://bucket/photos/ --output s3://bucket/photos-vqgan-parquet/ --gpus-per-actor 1
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("shards", "images"))
    parser.add_argument("--model", required=True,
                        help="Hub id, or a checkpoint directory every node can read")
    parser.add_argument("--input", required=True,
                        help="shards: tar URLs (brace pattern); images: a folder of image files")
    parser.add_argument("--output", required=True, help="output directory (local or s3://...)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address ('auto', 'ray://head:10001'); default: a "
                             "local Ray, or the one in RAY_ADDRESS")
    parser.add_argument("--actors", type=int, default=None,
                        help="default: the cluster's GPUs / --gpus-per-actor")
    parser.add_argument("--gpus-per-actor", type=float, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="per device")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--on-error", choices=("raise", "skip", "null"), default=None,
                        help="default: skip for shards, null for images")
    return parser.parse_args(argv)


def tokenize_shards(args: argparse.Namespace) -> int:
    from vqgan_datasets.ray import tokenize

    manifest = tokenize(
        args.input, args.output, model=args.model, image_size=args.image_size,
        batch_size=args.batch_size, on_error=args.on_error or "skip", address=args.address,
        num_actors=args.actors, num_gpus_per_actor=args.gpus_per_actor,
    )
    totals = manifest.totals
    print(f"{len(manifest.written)} shards written, {len(manifest.finished)} already done, "
          f"{len(manifest.failed_shards)} failed; {totals['encoded']} of "
          f"{totals['samples_in']} samples encoded; manifest: {manifest.path}")
    return 1 if manifest.failed_shards else 0


def tokenize_images(args: argparse.Namespace) -> int:
    import ray

    from vqgan_datasets.ray import RayTokenizer

    if not ray.is_initialized():
        ray.init(address=args.address)
    actors = args.actors or max(1, int(ray.cluster_resources().get("GPU", 0)
                                       // (args.gpus_per_actor or 1)))
    # Raw file bytes: the actors decode and resize, so the object store carries JPEGs, not pixels.
    files = ray.data.read_binary_files(args.input, include_paths=True)
    tokens = files.map_batches(
        RayTokenizer,
        fn_constructor_kwargs={"model": args.model, "image_column": "bytes",
                               "image_size": args.image_size, "batch_size": args.batch_size,
                               "on_error": args.on_error or "null"},
        batch_size=args.batch_size * max(1, int(args.gpus_per_actor)),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=args.gpus_per_actor,
    )
    tokens.write_parquet(args.output)
    print(f"wrote token rows to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vqgan_datasets").setLevel(logging.INFO)
    return tokenize_shards(args) if args.mode == "shards" else tokenize_images(args)


if __name__ == "__main__":
    sys.exit(main())
