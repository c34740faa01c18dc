"""Tokenize an image dataset and publish the tokens on the Hugging Face Hub, metadata included.

    python examples/push_to_hub.py --model flax-community/vqgan_f16_16384 \
        --dataset-dir ./my_images --repo-id ORG/NAME

`--dataset-dir` is a dataset saved with `save_to_disk` (a Dataset or a DatasetDict) with an
"image" column (`--image-column` otherwise). Pushing needs a Hugging Face token with write access
to ORG/NAME, in HF_TOKEN or from `hf auth login`. The files are written by `write_hub_files`
(the layout `push_to_hub` uses: `data/{split}-00000-of-00001.parquet` shards and a README.md
card, which replaces the repo's README.md) and uploaded in one commit; `--dry-run DIR` uploads nothing and leaves them in DIR, where
`datasets.load_dataset(DIR)` reads them as it would read the Hub repo.

The tokenizer record travels in the card and in every parquet file's schema metadata, so
anyone can decode the result without knowing which model made it:

    ds = load_dataset("ORG/NAME", split="train")           # the card's record
    images = ds.with_transform(VQGANDetokenizer.from_dataset(ds))
    stream = load_dataset("parquet", data_files="hf://datasets/ORG/NAME/data/*.parquet",
                          split="train", streaming=True)   # the files' record
    detok = VQGANDetokenizer.from_dataset(stream)
    detok = VQGANDetokenizer.from_dataset("DIR/data/*.parquet")   # files on disk
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="flax-community/vqgan_f16_16384",
                        help="Hub id or local directory of the VQGAN")
    parser.add_argument("--dataset-dir", required=True, help="a dataset saved with save_to_disk")
    parser.add_argument("--repo-id", required=True, help="the Hub dataset repo, ORG/NAME")
    parser.add_argument("--dry-run", metavar="DIR", help="write the files here instead of pushing")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--image-size", type=int, default=None,
                        help="default: the model's resolution")
    parser.add_argument("--on-error", choices=("raise", "skip", "null"), default="raise")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from datasets import load_from_disk

    from vqgan_datasets.hf import VQGANTokenizer, write_hub_files

    dataset = load_from_disk(args.dataset_dir)
    tokenizer = VQGANTokenizer(args.model, image_column=args.image_column,
                               image_size=args.image_size, on_error=args.on_error)
    # map(batched=True) + the tokenizer's metadata in dataset.info (see vqgan_datasets.hf).
    tokens = tokenizer.apply(dataset)

    if args.dry_run:
        for path in write_hub_files(tokens, args.dry_run):
            print(path)
        return 0

    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get("HF_TOKEN"))  # None: the `hf auth login` token
    api.create_repo(args.repo_id, repo_type="dataset", private=args.private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        write_hub_files(tokens, folder)
        # One commit: the shards (replacing an earlier push's) and the card with the record.
        api.upload_folder(repo_id=args.repo_id, repo_type="dataset", folder_path=folder,
                          delete_patterns=["data/*.parquet"],
                          commit_message="Upload VQGAN tokens (vqgan_datasets)")
    print(f"https://huggingface.co/datasets/{args.repo_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
