"""Tokenize webdataset shards on every host of a TPU pod or a multi-node GPU job, exactly once.

Run the same command on every host. Each host converts the shards i with i % hosts == its index
on its own devices; at the end all hosts meet and host 0 writes one manifest.json.

    # Cloud TPU pod slice: JAX finds the other hosts itself
    gcloud compute tpus tpu-vm ssh my-pod --zone us-central2-b --worker=all --command \
      "python examples/multihost_tokenize.py --multihost auto \
         --model flax-community/vqgan_f16_16384 \
         --input 'gs://bucket/shards/{00000..99999}.tar' --output gs://bucket/tokens/"

    # SLURM (one task per node): srun python examples/multihost_tokenize.py --multihost auto ...

    # anywhere else, by hand: host 0's address, the host count and this host's index
    python examples/multihost_tokenize.py --coordinator 10.0.0.1:1234 --num-processes 4 \
        --process-id $RANK --model ... --input ... --output ...

If a host dies, JAX ends the others (after --heartbeat-timeout seconds); restart the same
command on every host and it carries on, with every sample written once.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hub id or local checkpoint directory")
    parser.add_argument("--input", required=True, help="shard URLs: a brace pattern, gs://...")
    parser.add_argument("--output", required=True, help="output directory (shared by all hosts)")
    parser.add_argument("--multihost", choices=("auto", "off"), default="off",
                        help="auto: let JAX detect a TPU pod, SLURM, MPI or Kubernetes job")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--heartbeat-timeout", type=int, default=100,
                        help="seconds before the other hosts give up on a dead one")
    parser.add_argument("--batch-size", type=int, default=64, help="per device")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--on-error", choices=("raise", "skip", "null"), default="skip")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vqgan_datasets").setLevel(logging.INFO)

    from vqgan_datasets.jobs import distributed

    # First, before anything touches a JAX device.
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           auto=args.multihost == "auto",
                           heartbeat_timeout_seconds=args.heartbeat_timeout)

    from vqgan_datasets import VQModel
    from vqgan_datasets.wds import tokenize_shards

    model = VQModel.from_pretrained(args.model)
    manifest = tokenize_shards(args.input, args.output, model=model, image_size=args.image_size,
                               batch_size=args.batch_size, on_error=args.on_error,
                               progress=not args.no_progress)
    mine = "all hosts" if manifest.process_index == 0 else f"host {distributed.process_index()}"
    totals = manifest.totals
    print(f"{mine}: {len(manifest.written)} shards written, {len(manifest.finished)} already "
          f"done, {len(manifest.failed_shards)} failed; {totals['encoded']} samples encoded; "
          f"manifest: {manifest.path}")
    return 1 if manifest.failed_shards else 0


if __name__ == "__main__":
    sys.exit(main())
