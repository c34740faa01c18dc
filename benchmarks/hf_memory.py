"""Memory, time and disk cost of tokenizing an image dataset with `Dataset.map`.

    python benchmarks/hf_memory.py [--rows 10000] [--token-rows 100000] [--workdir DIR]

1. Builds an on-disk dataset of `--rows` 64×64 PNG crops of scikit-image's photos.
2. Tokenizes it with `ds.map(tok, batched=True)` (a random tiny VQGAN at 64², 16×16 tokens) in
   a fresh process per variant, and reports the peak RSS of that process
   (`getrusage().ru_maxrss`, which includes Python, JAX and the compiled model), its RSS before
   `map`, and the time of `map` after a warm-up that compiles the model. Variants: the default
   (image column dropped) and `keep_image=True` through `tok.apply` (writer_batch_size=100).
3. Writes `--token-rows` rows of 256 uint16 tokens (uniform over 16,384 codes, the f16-16384
   layout; real tokens are less uniform, so parquet will do somewhat better) as a datasets Arrow
   file and as parquet, and extrapolates the size to 1M rows.

Each step runs in its own process so that one step's peak does not hide another's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
SIZE = 64


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_dataset(workdir: Path, rows: int) -> dict:
    """64×64 PNG crops at random positions and scales of a few real photos, written to disk."""
    import io

    import numpy as np
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage
    from skimage import data

    sources = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
    sources = [PILImage.fromarray(a[..., :3] if a.ndim == 3 else a).convert("RGB") for a in sources]

    def generate():
        rng = np.random.default_rng(0)
        for i in range(rows):
            photo = sources[i % len(sources)]
            side = int(rng.integers(SIZE, min(photo.size)))
            left = int(rng.integers(0, photo.size[0] - side + 1))
            top = int(rng.integers(0, photo.size[1] - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize((SIZE, SIZE))
            buf = io.BytesIO()
            crop.save(buf, "PNG")
            yield {"image": {"bytes": buf.getvalue(), "path": None}, "id": f"img{i:06d}"}

    features = Features({"image": Image(), "id": Value("string")})
    ds = Dataset.from_generator(generate, features=features, cache_dir=str(workdir / "gen"),
                                writer_batch_size=500)
    ds.save_to_disk(str(workdir / "images"))
    nbytes = sum(p.stat().st_size for p in (workdir / "images").glob("*.arrow"))
    return {"rows": rows, "dataset_mb": nbytes / 2**20}


def make_model(workdir: Path) -> str:
    from vqgan_datasets.models.config import VQGANConfig
    from vqgan_datasets.models.modeling import VQModel

    config = VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                         resolution=SIZE, z_channels=32, embed_dim=16, n_embed=64)
    out = workdir / "model"
    VQModel(config, seed=0).save_pretrained(out)
    return str(out)


def run_map(workdir: Path, variant: str) -> dict:
    import datasets

    from vqgan_datasets.hf import VQGANTokenizer

    datasets.disable_progress_bars()
    ds = datasets.load_from_disk(str(workdir / "images"))
    tok = VQGANTokenizer(str(workdir / "model"), keep_image=variant == "keep_image")
    # Warm-up: load and compile on a slice, in memory (not cached).
    ds.select(range(64)).map(tok, batched=True, keep_in_memory=True)
    rss_before, peak_before = _rss_mb(), _peak_mb()
    start = time.perf_counter()
    cache = str(workdir / f"tokens-{variant}.arrow")
    if variant == "keep_image":
        out = tok.apply(ds, cache_file_name=cache, load_from_cache_file=False)
    else:
        out = ds.map(tok, batched=True, cache_file_name=cache, load_from_cache_file=False)
    seconds = time.perf_counter() - start
    return {
        "variant": variant, "rows": len(out), "seconds": seconds, "images_per_s": len(out) / seconds,
        "rss_before_map_mb": rss_before, "peak_before_map_mb": peak_before,
        "peak_rss_mb": _peak_mb(), "rss_after_mb": _rss_mb(),
        "output_mb": os.path.getsize(cache) / 2**20, "columns": out.column_names,
        "token_type": str(out.data.schema.field("vqgan_tokens").type),
    }


def token_sizes(workdir: Path, rows: int) -> dict:
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset, Features, List, Value

    tokens = np.random.default_rng(0).integers(0, 16384, (rows, 256), dtype=np.uint16)
    column = pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), 256)
    features = Features({"vqgan_tokens": List(Value("uint16"), length=256)})
    ds = Dataset(pa.table({"vqgan_tokens": column}), info=None).cast(features)
    ds.save_to_disk(str(workdir / "token_arrow"))
    arrow = sum(p.stat().st_size for p in (workdir / "token_arrow").glob("*.arrow"))
    parquet_path = workdir / "tokens.parquet"
    ds.to_parquet(str(parquet_path))
    parquet = parquet_path.stat().st_size
    import datasets

    loaded = datasets.load_from_disk(str(workdir / "token_arrow"))
    start = time.perf_counter()
    array = np.asarray(loaded.with_format("numpy", dtype=np.uint16)[:]["vqgan_tokens"])
    read_s = time.perf_counter() - start
    assert array.shape == (rows, 256) and array.dtype == np.uint16
    return {
        "rows": rows,
        "arrow_bytes_per_row": arrow / rows, "parquet_bytes_per_row": parquet / rows,
        "arrow_mb_per_1m_rows": arrow / rows * 1e6 / 2**20,
        "parquet_mb_per_1m_rows": parquet / rows * 1e6 / 2**20,
        "read_to_numpy_s": read_s,
    }


def _child(step: str, workdir: Path, rows: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--step", step, "--workdir", str(workdir), "--rows", str(rows)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode:
        raise SystemExit(f"step {step} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--token-rows", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        workdir = args.workdir
        step = {
            "make": lambda: {**make_dataset(workdir, args.rows), "model": make_model(workdir)},
            "map": lambda: run_map(workdir, "default"),
            "map_keep_image": lambda: run_map(workdir, "keep_image"),
            "tokens": lambda: token_sizes(workdir, args.rows),
        }[args.step]
        print(json.dumps(step()))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        made = _child("make", workdir, args.rows)
        print(f"dataset: {made['rows']} PNG images {SIZE}x{SIZE}, {made['dataset_mb']:.1f} MB on disk")
        for step in ("map", "map_keep_image"):
            r = _child(step, workdir, args.rows)
            print(
                f"map ({r['variant']}): {r['rows']} rows in {r['seconds']:.1f} s "
                f"({r['images_per_s']:.0f} images/s); RSS before map {r['rss_before_map_mb']:.0f} MB,"
                f" peak {r['peak_rss_mb']:.0f} MB (peak before map {r['peak_before_map_mb']:.0f} MB);"
                f" output {r['output_mb']:.1f} MB, columns {r['columns']}, tokens {r['token_type']}"
            )
        t = _child("tokens", workdir, args.token_rows)
        print(
            f"tokens: {t['rows']} rows x 256 uint16: Arrow {t['arrow_bytes_per_row']:.1f} B/row, "
            f"parquet {t['parquet_bytes_per_row']:.1f} B/row; extrapolated to 1M rows: Arrow "
            f"{t['arrow_mb_per_1m_rows']:.0f} MiB, parquet {t['parquet_mb_per_1m_rows']:.0f} MiB; "
            f"column to numpy in {t['read_to_numpy_s']:.2f} s"
        )


if __name__ == "__main__":
    main()
