"""Tokenize an image dataset and publish the tokens on the Hugging Face Hub, record included.

    python examples/push_to_hub.py --model flax-community/vqgan_f16_16384 \
        --dataset-dir ./my_images --repo-id ORG/NAME

`--dataset-dir` is a dataset saved with `save_to_disk` (a Dataset or a DatasetDict) with an
"image" column (`--image-column` otherwise). The two steps are the CLI's `encode` and `push`
(`vqgan-datasets encode DIR tokens/` then `vqgan-datasets push tokens/ ORG/NAME`): parquet files
under data/ and a README.md card, both carrying the tokenizer record, uploaded in several
commits, so that rerunning after an interruption sends only what the repo lacks. Pushing needs
a token with write access to ORG/NAME (`hf auth login`, or HF_TOKEN). `--dry-run DIR` uploads
nothing and writes the files into DIR, where `load_dataset(DIR)` reads them as it would the repo.

Reading the tokens back, anywhere:

    ds = load_dataset("ORG/NAME", split="train")
    images = VQGANDetokenizer.from_dataset(ds).apply(ds)
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="flax-community/vqgan_f16_16384",
                        help="Hub id or local directory of the VQGAN")
    parser.add_argument("--dataset-dir", required=True, help="a dataset saved with save_to_disk")
    parser.add_argument("--repo-id", required=True, help="the Hub dataset repo, ORG/NAME")
    parser.add_argument("--dry-run", metavar="DIR", help="write the files here instead of pushing")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--on-error", choices=("raise", "skip", "null"), default="raise")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from vqgan_datasets.jobs.commands import encode
    from vqgan_datasets.jobs.push import push

    with tempfile.TemporaryDirectory() as tokens:
        encode(args.dataset_dir, tokens, model=args.model, image_column=args.image_column,
               on_error=args.on_error, progress=False)
        summary = push(tokens, args.repo_id, dry_run=args.dry_run, private=args.private)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
