"""Tokenize an image dataset and publish the tokens on the Hugging Face Hub, metadata included.

    python examples/push_to_hub.py --model flax-community/vqgan_f16_16384 \
        --dataset-dir ./my_images --repo-id ORG/NAME

`--dataset-dir` is a dataset saved with `save_to_disk` (a Dataset or a DatasetDict) with an
"image" column (`--image-column` otherwise). Pushing needs a Hugging Face token with write access
to ORG/NAME, in HF_TOKEN or from `hf auth login`. `--dry-run DIR` pushes nothing and writes the
same files into DIR instead: `data/{split}-00000-of-00001.parquet` shards and the README.md card;
`datasets.load_dataset(DIR)` then reads them as it would read the Hub repo.

Anyone can decode the result without knowing which model made it:

    ds = load_dataset("ORG/NAME", split="train")
    images = ds.with_transform(VQGANDetokenizer.from_dataset(ds))
"""

from __future__ import annotations

import argparse
import logging
import os


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

    from vqgan_datasets.hf import VQGANTokenizer, update_dataset_card, write_hub_files

    dataset = load_from_disk(args.dataset_dir)
    tokenizer = VQGANTokenizer(args.model, image_column=args.image_column,
                               image_size=args.image_size, on_error=args.on_error)
    # map(batched=True) + the tokenizer's metadata in dataset.info (see vqgan_datasets.hf).
    tokens = tokenizer.apply(dataset)

    if args.dry_run:
        for path in write_hub_files(tokens, args.dry_run):
            print(path)
        return 0

    from huggingface_hub import DatasetCard

    token = os.environ.get("HF_TOKEN")  # None: huggingface_hub uses the `hf auth login` token
    tokens.push_to_hub(args.repo_id, token=token, private=args.private)
    # push_to_hub writes the card's dataset_info without the description that carries our
    # metadata; put it (and a readable `vqgan_datasets` YAML key) back in a second commit.
    card = DatasetCard.load(args.repo_id, repo_type="dataset", token=token)
    update_dataset_card(card, tokens).push_to_hub(
        args.repo_id, repo_type="dataset", token=token,
        commit_message="Record the VQGAN tokenizer that made the tokens",
    )
    print(f"https://huggingface.co/datasets/{args.repo_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
