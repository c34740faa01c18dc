"""Decode a token dataset back into images, lazily, with the model recorded in its metadata.

    python examples/decode_tokens.py --tokens tokens/ --output decoded/ [--model PATH]

Only the rows that are indexed are decoded (`with_transform`); `--stream` decodes through an
`IterableDataset` instead, without materializing anything.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from datasets import load_from_disk

from vqgan_datasets import VQGANDetokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", required=True, help="a token dataset saved with save_to_disk")
    parser.add_argument("--output", required=True, help="a folder for the PNG files")
    parser.add_argument("--model", default=None, help="default: the model recorded with the tokens")
    parser.add_argument("--limit", type=int, default=4, help="how many rows to decode")
    parser.add_argument("--stream", action="store_true", help="decode as an IterableDataset")
    args = parser.parse_args(argv)

    ds = load_from_disk(args.tokens)
    detok = VQGANDetokenizer.from_dataset(ds, model=args.model)  # refuses tokens of other weights
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.stream:
        rows = itertools.islice(ds.to_iterable_dataset().map(detok, batched=True), args.limit)
    else:
        lazy = ds.with_transform(detok)
        rows = (lazy[i] for i in range(min(args.limit, len(ds))))
    for i, row in enumerate(rows):
        row["image"].save(out / f"{i:05d}.png")
    print(f"decoded {min(args.limit, len(ds))} images into {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
