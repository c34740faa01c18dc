"""The datasets one-liner against `apply`, on an `Image()` column of JPEGs: what eager decoding costs.

    python benchmarks/hf_oneliner.py [--rows 200] [--repeats 3] [--model vqgan_datasets/_demo/model]

Builds an on-disk dataset of `--rows` JPEGs (quality 90) cut from scikit-image's photos and
resized to a long side of 400-1100 px, then times, in one process after a warm-up that loads and
compiles the model, `--repeats` interleaved runs of:

- `ds.map(tok, batched=True)`: the one-liner on an unformatted dataset (datasets hands a
  LazyBatch; the tokenizer reads the encoded bytes from its Arrow table);
- `tok.apply(ds)`;
- `ds.to_iterable_dataset().map(tok, batched=True)`: a stream, where datasets decodes every image
  with PIL in this process before the call (the eager decoding `apply` avoids by casting the
  column to `Image(decode=False)`);
- `tok.apply(ds.to_iterable_dataset())`;
- the engine alone on the same bytes (`Engine.encode_iter`), the ceiling;
- datasets' own decoding alone (`Image().decode_example`, one thread): the serial work the
  stream one-liner adds in front of the tokenizer.

Prints images/s (median of the repeats) and each path's ratio to `apply` on the same kind of
dataset. Output datasets go to a temp dir (`load_from_cache_file=False`, so each run encodes).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]


def make_jpegs(rows: int) -> list[bytes]:
    """JPEGs of 400-1100 px (long side) cut at random from a few real photos."""
    import numpy as np
    from PIL import Image
    from skimage import data

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
    sources = [Image.fromarray(getattr(data, n)()[..., :3]).convert("RGB") for n in names]
    rng = np.random.default_rng(0)
    out = []
    for i in range(rows):
        photo = sources[i % len(sources)]
        w, h = photo.size
        cw, ch = int(rng.integers(w // 2, w + 1)), int(rng.integers(h // 2, h + 1))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((left, top, left + cw, top + ch))
        scale = int(rng.integers(400, 1101)) / max(cw, ch)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=str(REPO / "vqgan_datasets" / "_demo" / "model"),
                        help='a model directory, or "tiny": a random f16 model small enough that '
                             "the host, not the encoder, sets the pace (as on a GPU host)")
    parser.add_argument("--batch-size", type=int, default=None, help="per device")
    args = parser.parse_args()

    import datasets
    from datasets import Dataset, Features, Image, Value

    from vqgan_datasets.hf import VQGANTokenizer
    from vqgan_datasets.pipeline.engine import get_engine

    datasets.disable_progress_bars()
    jpegs = make_jpegs(args.rows)
    print(f"{len(jpegs)} JPEGs, mean {sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KB; "
          f"model {args.model}; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        features = Features({"image": Image(), "id": Value("string")})
        Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in jpegs],
                           "id": [f"img{i:05d}" for i in range(len(jpegs))]},
                          features=features).save_to_disk(f"{tmp}/images")
        ds = datasets.load_from_disk(f"{tmp}/images")
        model = args.model
        if model == "tiny":
            from vqgan_datasets.models.config import VQGANConfig
            from vqgan_datasets.models.modeling import VQModel

            model = f"{tmp}/tiny"
            VQModel(VQGANConfig(ch=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=0,
                                attn_resolutions=(), resolution=256, z_channels=8, embed_dim=8,
                                n_embed=64, norm_groups=4), seed=0).save_pretrained(model)
        tok = VQGANTokenizer(model, batch_size=args.batch_size)
        count = [0]

        def cached(**kw):
            count[0] += 1
            return {"cache_file_name": f"{tmp}/out{count[0]}.arrow", "load_from_cache_file": False,
                    **kw}

        def drain(stream) -> int:
            return sum(1 for _ in stream)

        engine = get_engine(tok.model, **tok.options.engine_kwargs())
        size = tok.spec.image_size
        paths = {
            "one-liner ds.map(tok, batched=True)": lambda: len(ds.map(tok, batched=True,
                                                                      **cached())),
            "tok.apply(ds)": lambda: len(tok.apply(ds, **cached())),
            "stream: .map(tok, batched=True)": lambda: drain(
                ds.to_iterable_dataset().map(tok, batched=True, remove_columns=["image"])),
            "stream: tok.apply(stream)": lambda: drain(tok.apply(ds.to_iterable_dataset())),
            "engine alone (encode_iter on the bytes)": lambda: sum(
                1 for _ in engine.encode_iter(jpegs, image_size=size)),
            "datasets' decode alone (one thread)": lambda: sum(
                1 for b in jpegs if Image().decode_example({"bytes": b, "path": None}).size),
        }
        for fn in paths.values():  # warm-up: load, compile every batch shape, start workers
            fn()
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, fn in paths.items():
                start = time.perf_counter()
                assert fn() == len(jpegs), name
                times[name].append(time.perf_counter() - start)
        rate = {name: len(jpegs) / statistics.median(t) for name, t in times.items()}
        base = {"stream": rate["stream: tok.apply(stream)"], "": rate["tok.apply(ds)"]}
        for name, r in rate.items():
            ref = base["stream"] if name.startswith("stream") else base[""]
            spread = ", ".join(f"{len(jpegs) / t:.1f}" for t in times[name])
            print(f"{name:42s} {r:7.1f} images/s  ({r / ref:.2f}x apply; runs: {spread})")


if __name__ == "__main__":
    main()
