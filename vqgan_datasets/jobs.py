"""Whole jobs, inputs on disk → outputs on disk: one function per `vqgan-datasets` command.

The CLI only parses arguments and calls one of these; they are also the Python API for the same
jobs. Image sources: a folder of image files, a datasets directory (`save_to_disk`), parquet
files or a folder of them, or `imagefolder:DIR` for datasets' imagefolder builder. Token
sources: a datasets directory written by `encode`, or token tar shards.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
DEMO_MODEL = Path(__file__).resolve().parents[1] / "model" / "demo"
DEMO_IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"


def is_shard_source(source: str | os.PathLike) -> bool:
    """Tar shards (a .tar path or pattern, a brace pattern, `pipe:`), as opposed to datasets."""
    text = os.fspath(source)
    return text.startswith("pipe:") or ".tar" in text or ("{" in text and ".." in text)


def open_images(source: str | os.PathLike, *, split: str = "train") -> Any:
    """Any image source as a `datasets.Dataset` with an `image` column (undecoded where possible)."""
    import datasets

    text = os.fspath(source)
    if text.startswith("imagefolder:"):
        loaded = datasets.load_dataset("imagefolder", data_dir=text.split(":", 1)[1], split=split)
        return loaded.cast_column("image", datasets.Image(decode=False))
    path = Path(text)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                          or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    parquet = _parquet_files(path)
    if parquet:
        return datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split=split)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(
                f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}), no parquet files and no saved "
                "dataset found"
            )
        return _image_files(files, path)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return _image_files([path], path.parent)
    raise FileNotFoundError(f"{text}: not an image folder, saved dataset, parquet file or image")


def _image_files(files: Sequence[Path], root: Path) -> Any:
    """Image files as a dataset of (file_name relative to root, undecoded image path)."""
    import datasets

    return datasets.Dataset.from_dict(
        {"file_name": [str(p.relative_to(root)) for p in files], "image": [str(p) for p in files]},
        features=datasets.Features(
            {"file_name": datasets.Value("string"), "image": datasets.Image(decode=False)}
        ),
    )


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".parquet":
        return [path]
    if path.is_dir():
        return sorted(path.rglob("*.parquet"))
    return []


def encode(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: Any = None,
    image_column: str = "image",
    image_size: int | None = None,
    batch_size: int = 8,
    on_error: str = "skip",
    value_range: tuple[float, float] | None = None,
    dtype: str | None = None,
    keep_image: bool = False,
    progress: bool = True,
    ray_address: str | None = None,
    num_actors: int | None = None,
    gpus_per_actor: float = 0,
    multihost: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize `source` into `output`: a datasets directory, or token shards for shard input.

    `ray_address` runs shard conversion on a Ray cluster ("" starts a local Ray); `multihost`
    holds `distributed.initialize` arguments for a JAX multi-host run (each host then converts
    its own shards, or its own part of a dataset). Returns a summary (rows, skipped, seconds,
    images/s, where it went)."""
    from .hf import DEFAULT_MODEL, VQGANTokenizer

    model = DEFAULT_MODEL if model is None else model
    start = time.perf_counter()
    if multihost is not None:
        from . import distributed

        distributed.initialize(**multihost)
    if is_shard_source(source):
        if value_range is not None or dtype is not None:
            # Shard workers take these settings from the model itself (its reference).
            model = _load_model(model, dtype=dtype, value_range=value_range)
        kwargs = dict(model=model, image_size=image_size, batch_size=batch_size,
                      on_error=on_error, keep_image=keep_image)
        if ray_address is not None:
            from .ray import tokenize as ray_tokenize

            manifest = ray_tokenize(
                os.fspath(source), os.fspath(output), address=ray_address or None,
                num_actors=num_actors, num_gpus_per_actor=gpus_per_actor, **kwargs
            )
        else:
            from .wds import tokenize_shards

            manifest = tokenize_shards(os.fspath(source), os.fspath(output), progress=progress,
                                       **kwargs)
        summary = _manifest_summary(manifest)
        summary["seconds"] = round(time.perf_counter() - start, 2)
        return summary
    import datasets

    if not progress:
        datasets.disable_progress_bars()
    dataset = open_images(source)
    if multihost is not None:
        from . import distributed

        dataset = distributed.split_dataset(dataset)
        output = Path(output) / f"process-{distributed.process_index():05d}"
    tokenizer = VQGANTokenizer(
        model, image_column=image_column, image_size=image_size, batch_size=batch_size,
        on_error=on_error, value_range=value_range, dtype=dtype, keep_image=keep_image,
    )
    tokens = tokenizer.apply(dataset, desc="vqgan-datasets encode")
    tokens.save_to_disk(os.fspath(output))
    seconds = time.perf_counter() - start
    return {
        "output": os.fspath(output),
        "rows_in": len(dataset),
        "rows_out": len(tokens),
        "skipped": tokenizer.stats.skipped,
        "nulls": tokenizer.stats.nulls,
        "seconds": round(seconds, 2),
        "images_per_second": round(len(dataset) / seconds, 2) if seconds else None,
        "tokens_per_image": tokenizer.spec.sequence_length,
        "token_dtype": tokenizer.spec.token_dtype,
    }


def _manifest_summary(manifest: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(manifest):
        data = dataclasses.asdict(manifest)
        return {k: v for k, v in data.items() if k != "shards"} | {
            "shards": len(data.get("shards", []))
        }
    return dict(manifest)


def decode(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: Any = None,
    token_column: str | None = None,
    batch_size: int = 8,
    image_format: str = "png",
    limit: int | None = None,
) -> dict[str, Any]:
    """Decode a token dataset (directory written by `encode`) or token shards into image files
    `output/{name}.{format}`, named by the file_name/key column when there is one."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    written = 0
    for name, image in _decoded_images(source, model, token_column, batch_size, limit):
        from PIL import Image

        stem = Path(str(name)).with_suffix("").as_posix().replace("/", "_")
        Image.fromarray(image).save(output / f"{stem}.{image_format}")
        written += 1
    seconds = time.perf_counter() - start
    return {"output": str(output), "images": written, "seconds": round(seconds, 2)}


def _decoded_images(source, model, token_column, batch_size, limit):
    """(name, uint8 image) pairs from a token dataset or token shards."""
    import itertools

    if is_shard_source(source):
        from . import wds

        if model is None:
            raise ValueError("decoding shards needs --model (shards carry no model reference)")
        samples = itertools.chain.from_iterable(wds.read_shard(u) for u in wds.expand_urls(source))
        stage = wds.decode(model, output_format="numpy", batch_size=batch_size, keep_tokens=False)
        for sample in itertools.islice(stage(samples), limit):
            yield sample["__key__"], sample["png"]
        return
    import datasets

    from .engine import get_engine
    from .hf import VQGANDetokenizer

    dataset = datasets.load_from_disk(os.fspath(source))
    detok = VQGANDetokenizer.from_dataset(dataset, model=model, token_column=token_column,
                                          batch_size=batch_size)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    names = _row_names(dataset)
    column = detok.token_column
    codes = (np.asarray(row[column]) for row in dataset.with_format("numpy", columns=[column]))
    engine = get_engine(detok.model, batch_size=batch_size)
    for name, result in zip(names, engine.decode_iter(codes, keys=names), strict=True):
        yield name, result.image


def _row_names(dataset: Any) -> list[str]:
    for column in ("file_name", "__key__", "key", "id", "path"):
        if column in dataset.column_names:
            return [str(v) for v in dataset[column]]
    width = len(str(max(len(dataset) - 1, 0)))
    return [f"{i:0{width}d}" for i in range(len(dataset))]


def _sample_images(source: str | os.PathLike, count: int) -> tuple[list[Any], list[str]]:
    dataset = open_images(source)
    dataset = dataset.select(range(min(count, len(dataset))))
    import datasets

    images = list(dataset.cast_column("image", datasets.Image(decode=False))["image"])
    return images, _row_names(dataset)


def preview(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: Any = None,
    count: int = 8,
    image_size: int | None = None,
    columns: int | None = None,
) -> Path:
    """A PNG grid: `count` images from `source` above their reconstructions."""
    from .report import preview as draw_preview

    images, _ = _sample_images(source, count)
    return draw_preview(_load_model(model), images, output, image_size=image_size,
                        columns=columns)


def report(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: Any = None,
    max_samples: int = 64,
    image_size: int | None = None,
) -> Path:
    """The HTML quality report for `model` on images from `source`, or on a token dataset."""
    from .report import build_report

    tokens = _token_dataset(Path(os.fspath(source)))
    if tokens is not None:
        dataset, column, spec = tokens
        loaded = _load_model(model if model is not None else spec.model_name)
        rows = dataset.select(range(min(max_samples, len(dataset))))[column]
        return build_report(loaded, tokens=np.asarray(rows), out_dir=output_dir,
                            max_samples=max_samples)
    images, _ = _sample_images(source, max_samples)
    return build_report(_load_model(model), images, out_dir=output_dir, image_size=image_size,
                        max_samples=max_samples)


def _token_dataset(path: Path) -> tuple[Any, str, Any] | None:
    """(dataset, token column, its TokenizerSpec) for a saved token dataset, else None."""
    if not (path.is_dir() and (path / "dataset_info.json").is_file()):
        return None
    import datasets

    from .hf import _read_column_metadata

    dataset = datasets.load_from_disk(str(path))
    try:
        column, spec = _read_column_metadata(dataset, None)
    except ValueError:
        return None
    return dataset, column, spec


def _load_model(model: Any, *, dtype: str | None = None,
                value_range: tuple[float, float] | None = None):
    from .hf import DEFAULT_MODEL
    from .modeling import VQModel

    if isinstance(model, VQModel):
        return model
    kwargs: dict[str, Any] = {"value_range": value_range}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return VQModel.from_pretrained(DEFAULT_MODEL if model is None else os.fspath(model), **kwargs)


def info(model: Any = None) -> dict[str, Any]:
    """The model (name, revision, digest, config, value range, dtype) and this host's devices."""
    import jax

    from .metadata import TokenizerSpec

    loaded = _load_model(model)
    spec = TokenizerSpec.from_model(loaded)
    devices = jax.local_devices()
    return {
        "model": loaded.name,
        "revision": loaded.revision,
        "weights_digest": loaded.weights_digest,
        "config": loaded.config.to_dict(),
        "value_range": list(loaded.config.value_range),
        "compute_dtype": spec.compute_dtype,
        "image_size": spec.image_size,
        "tokens_per_image": spec.sequence_length,
        "token_dtype": spec.token_dtype,
        "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in devices],
        "process": f"{jax.process_index()} of {jax.process_count()}",
    }


def convert(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    unsafe_pickle: bool = False,
) -> Path:
    """A taming-transformers .ckpt → a model directory (see checkpoints.convert_taming_checkpoint)."""
    from .checkpoints import convert_taming_checkpoint

    return convert_taming_checkpoint(checkpoint, output_dir, config, value_range=value_range,
                                     unsafe_pickle=unsafe_pickle)


def demo(
    output_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The quickstart's main job, offline: tokenize the sample photos with the bundled demo
    checkpoint into a datasets directory, decode them back, and write a preview grid."""
    out = Path(output_dir)
    model_dir = Path(model) if model is not None else DEMO_MODEL
    image_dir = Path(images) if images is not None else DEMO_IMAGES
    for what, path in (("demo checkpoint", model_dir), ("sample images", image_dir)):
        if not path.is_dir():
            raise FileNotFoundError(
                f"{what} not found at {path}: run from a clone of the repository installed with "
                "`pip install -e .`, or pass --model/--images"
            )
    encoded = encode(image_dir, out / "tokens", model=str(model_dir), on_error="raise",
                     progress=progress)
    decoded = decode(out / "tokens", out / "decoded")
    grid = preview(image_dir, out / "preview.png", model=str(model_dir), count=encoded["rows_out"])
    return {"tokens": encoded, "decoded": decoded, "preview": str(grid)}

