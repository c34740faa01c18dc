"""Bytes per sample of token shards: webdataset's PAX TarWriter against our ustar writer.

    python benchmarks/tar_bytes.py [--samples 50000] [--tokens 256] [--dtype uint16]

Writes the same `--samples` token members (`<key>.vqgan.npy`, `--tokens` ids of `--dtype`, the
.npy bytes numpy writes) and the same keys twice into memory: once with webdataset's
`TarWriter(format="PAX_FORMAT")` as token shards were written before (a float mtime per member,
which PAX records in an extended header), once with `tarsamples.TarSampleWriter` (plain ustar
headers, a fixed integer mtime). Prints bytes per sample for each, the ratio, and whether two
writes of the same samples give identical bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io

import numpy as np

from vqgan_datasets.tarsamples import TarSampleWriter


def _samples(count: int, tokens: int, dtype: str) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        np.save(buffer, rng.integers(0, 1024, tokens).astype(dtype))
        out.append({"__key__": f"{i:08d}", "vqgan.npy": buffer.getvalue()})
    return out


def _webdataset(samples: list[dict]) -> bytes:
    from webdataset import TarWriter

    f = io.BytesIO()
    writer = TarWriter(f, format="PAX_FORMAT", encoder=False, keep_meta=True)
    for sample in samples:
        writer.write(sample)
    writer.close()
    return f.getvalue()


def _ours(samples: list[dict]) -> bytes:
    f = io.BytesIO()
    writer = TarSampleWriter(f)
    for sample in samples:
        writer.write(sample)
    writer.close()
    return f.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dtype", default="uint16")
    args = parser.parse_args()
    samples = _samples(args.samples, args.tokens, args.dtype)
    member = len(samples[0]["vqgan.npy"])
    print(f"{args.samples} samples, one {member}-byte .npy member each")
    sizes = {}
    for name, write in (("webdataset PAX", _webdataset), ("ustar (ours)", _ours)):
        first, second = write(samples), write(samples)
        same = hashlib.sha256(first).digest() == hashlib.sha256(second).digest()
        sizes[name] = len(first)
        print(f"{name:15s} {len(first):>12,d} bytes  {len(first) / args.samples:8.1f} bytes/sample"
              f"  identical on rewrite: {same}")
    print(f"ratio {sizes['webdataset PAX'] / sizes['ustar (ours)']:.2f}x")


if __name__ == "__main__":
    main()
