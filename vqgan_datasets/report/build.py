"""The visual quality report and previews: encode and decode sample images (or decode given
tokens) through the engine, then write a self-contained HTML page of the results.

`preview` and `build_report` use every local device. The report is one HTML file (images as
base64 PNG data URIs) with reconstruction grids, PSNR, codebook usage and throughput; its plots
are also written next to it as PNG files, and its numbers as `summary.json`. The metrics live in
quality.py and the pictures in pictures.py; their public names are re-exported here.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import html
import io
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import __version__
from ..metadata import TokenizerSpec
from ..pipeline.engine import get_engine
from ..pipeline.images import ImageInput, preprocess_batch
from ..storage import atomic_write
from .pictures import codebook_plot, png_bytes, preview_grid, side_by_side, tile_grid
from .quality import PSNR_CAP_DB, CodebookUsage, codebook_usage, psnr

__all__ = [
    "PSNR_CAP_DB",
    "CodebookUsage",
    "build_report",
    "codebook_usage",
    "preview",
    "preview_grid",
    "psnr",
]

logger = logging.getLogger(__name__)

_REPORT_GRID_MAX = 32  # samples shown in the HTML grid; preview.png holds them all


def preview(
    model: Any,
    images: Sequence[ImageInput],
    out_path: str | os.PathLike,
    *,
    image_size: int | None = None,
    columns: int | None = None,
) -> Path:
    """Encode and decode `images` on every local device; save their preview grid as a PNG."""
    engine = get_engine(model)
    pixels = _load_images(images, model, image_size, limit=None)
    reconstructions = engine.decode(engine.encode(pixels))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_path, png_bytes(preview_grid(pixels, reconstructions, columns=columns)))
    return out_path


# -- the report -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Throughput:
    encode: float | None  # images/s, None when only tokens were given
    decode: float
    samples: int
    devices: int
    platform: str
    device_kind: str
    batch_size: int  # global


def build_report(
    model: Any,
    images: Iterable[ImageInput] | None = None,
    *,
    tokens: Any = None,
    out_dir: str | os.PathLike,
    image_size: int | None = None,
    max_samples: int = 64,
    title: str | None = None,
    num_worst: int = 4,
) -> Path:
    """Write `out_dir/report.html` for `model` on the first `max_samples` of `images`, or of
    `tokens` (an integer array [N, h*w] or a token dataset column; then no PSNR is measured).

    Also writes preview.png, codebook.png and summary.json next to it. Throughput excludes
    compilation (each shape is run once first) and host preprocessing.
    """
    if (images is None) == (tokens is None):
        raise ValueError("build_report needs exactly one of images= or tokens=")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive int, got {max_samples!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = get_engine(model)
    config = model.config
    started = time.perf_counter()

    if images is not None:
        pixels = _load_images(images, model, image_size, limit=max_samples)
        size = pixels.shape[1]
        codes, encode_rate = _timed(engine.encode, pixels, engine.global_batch_size)
        reconstructions, decode_rate = _timed(engine.decode, codes, engine.global_batch_size)
        scores = psnr(pixels, reconstructions)
    else:
        codes = _load_tokens(tokens, max_samples)
        grid = config.grid_shape(image_size) if image_size is not None else None
        decode = functools.partial(engine.decode, grid=grid)
        reconstructions, decode_rate = _timed(decode, codes, engine.global_batch_size)
        pixels, scores, encode_rate = None, None, None
        size = reconstructions.shape[1]
    n = len(codes)
    usage = codebook_usage(codes, config.n_embed)
    device = engine.devices[0]
    throughput = _Throughput(
        encode=encode_rate, decode=decode_rate, samples=n, devices=engine.num_devices,
        platform=device.platform, device_kind=getattr(device, "device_kind", device.platform),
        batch_size=engine.global_batch_size,
    )
    spec = TokenizerSpec.from_model(model, size)

    # Pictures: the full grid goes to preview.png, the first _REPORT_GRID_MAX into the HTML.
    if pixels is not None:
        grid_image = preview_grid(pixels, reconstructions)
        shown = min(n, _REPORT_GRID_MAX)
        html_grid = grid_image if shown == n else preview_grid(pixels[:shown],
                                                               reconstructions[:shown])
    else:
        grid_image = tile_grid(reconstructions)
        shown = min(n, _REPORT_GRID_MAX)
        html_grid = grid_image if shown == n else tile_grid(reconstructions[:shown])
    grid_png = png_bytes(grid_image)
    html_grid_png = grid_png if html_grid is grid_image else png_bytes(html_grid)
    codebook_png = codebook_plot(usage)
    _write_atomic(out_dir / "preview.png", grid_png)
    _write_atomic(out_dir / "codebook.png", codebook_png)

    worst = []
    if scores is not None:
        for i in np.argsort(scores, kind="stable")[: max(0, num_worst)]:
            pair = png_bytes(side_by_side(pixels[i], reconstructions[i]))
            worst.append((int(i), float(scores[i]), pair))

    title = title or f"VQGAN report: {model.name or 'in-memory model'}"
    summary = _summary(title, spec, usage, throughput, scores, n, size)
    page = _render_html(
        title=title, spec=spec, summary=summary, usage=usage, throughput=throughput,
        grid_png=html_grid_png, shown=shown, codebook_png=codebook_png, worst=worst,
        from_tokens=pixels is None,
    )
    _write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
    path = out_dir / "report.html"
    _write_atomic(path, page.encode("utf-8"))
    logger.info("wrote %s (%d samples, %.1f s)", path, n, time.perf_counter() - started)
    return path


def _load_images(images: Iterable[ImageInput], model: Any, image_size: int | None,
                 limit: int | None) -> np.ndarray:
    size = model.config.resolution if image_size is None else image_size
    sample = list(images if limit is None else itertools.islice(images, limit))
    if not sample:
        raise ValueError("no images given")
    preprocess = model.config.preprocess  # the model family's own, as encoding uses
    return preprocess_batch(sample, size, on_error="raise", preprocess=preprocess).pixels


def _load_tokens(tokens: Any, limit: int) -> np.ndarray:
    rows = tokens[:limit] if isinstance(tokens, np.ndarray) else list(
        itertools.islice(tokens, limit))
    try:
        codes = np.asarray(rows)
    except ValueError as e:  # ragged rows
        raise ValueError(f"tokens must be rows of one length [N, h*w]: {e}") from None
    if codes.ndim != 2 or not len(codes) or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids [N>0, h*w], got {codes.dtype} {codes.shape}")
    return codes


def _timed(fn: Callable[[np.ndarray], np.ndarray], rows: np.ndarray,
           batch: int) -> tuple[np.ndarray, float]:
    """fn(rows) and its rate in rows/s, after running each batch shape it uses once (a full
    batch, and the remainder) so that compilation is not timed."""
    n = len(rows)
    for warm in sorted({min(n, batch), n % batch} - {0}):
        fn(rows[:warm])
    start = time.perf_counter()
    out = fn(rows)  # the engine returns host arrays: the work is done when this returns
    return out, n / max(time.perf_counter() - start, 1e-9)


def _summary(title: str, spec: Any, usage: CodebookUsage, throughput: _Throughput,
             scores: np.ndarray | None, n: int, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "title": title,
        "samples": n,
        "image_size": size,
        "model": {"name": spec.model_name, "revision": spec.revision,
                  "weights_digest": spec.weights_digest, "fingerprint": spec.fingerprint()},
        "codebook": usage.to_dict(),
        "throughput": dataclasses.asdict(throughput),
        "library_version": __version__,
    }
    if scores is not None:
        capped = np.minimum(scores, PSNR_CAP_DB)
        out["psnr_db"] = {
            "mean": float(capped.mean()), "median": float(np.median(capped)),
            "min": float(capped.min()), "max": float(capped.max()),
            "per_sample": [float(s) for s in capped], "cap": PSNR_CAP_DB,
        }
    return out


# -- HTML -------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #666; }
table { border-collapse: collapse; } td, th { padding: 2px 12px 2px 0; text-align: left;
        vertical-align: top; } th { color: #555; font-weight: 600; }
.num { font-variant-numeric: tabular-nums; }
.big { font-size: 1.5em; font-weight: 600; }
.stats { display: flex; gap: 2.5em; flex-wrap: wrap; margin: 0.8em 0; }
.stats div span { display: block; color: #666; font-size: 0.9em; }
img.pixels { image-rendering: pixelated; max-width: 100%; }
figure { display: inline-block; margin: 0 1.2em 1em 0; } figcaption { color: #444; }
code { font-size: 0.92em; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, id_: str | None = None, css: str = "pixels",
         min_width: int | None = None) -> str:
    id_attr = f' id="{id_}"' if id_ else ""
    width = ""
    if min_width:  # tiny tiles (64 px) are unreadable at 1:1; scale them up, never down
        with Image.open(io.BytesIO(png)) as image:
            natural = image.size[0]
        if natural < min_width:
            width = f' width="{natural * max(1, min_width // natural)}"'
    return (f'<img{id_attr} class="{css}" alt="{html.escape(alt)}"{width} '
            f'src="{_data_uri(png)}">')


def _stat(label: str, value: str, id_: str) -> str:
    return f'<div><span>{html.escape(label)}</span><b class="big num" id="{id_}">{value}</b></div>'


def _digest_prefix(digest: str, length: int = 16) -> str:
    algorithm, _, hexdigest = digest.rpartition(":")
    return f"{algorithm}:{hexdigest[:length]}…" if algorithm else f"{hexdigest[:length]}…"


def _fmt_db(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.2f}"


def _render_html(*, title, spec, summary, usage, throughput, grid_png, shown, codebook_png,
                 worst, from_tokens) -> str:
    e = html.escape
    n = summary["samples"]
    size = summary["image_size"]
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f'<h1 id="title">{e(title)}</h1>',
        f'<p class="meta">{n} sample{"s" if n != 1 else ""} at {size}×{size}, '
        f"{'decoded from given tokens' if from_tokens else 'encoded and decoded'} on "
        f"{throughput.devices} × {e(throughput.device_kind)} · vqgan-datasets {e(__version__)}"
        f" · {created}</p>",
    ]

    # Reconstructions
    heading = "Decoded tokens" if from_tokens else "Reconstructions"
    caption = ("decoded images" if from_tokens
               else "each original above its reconstruction")
    more = f"; the first {shown} of {n} shown, all in preview.png" if shown < n else ""
    parts += [f"<h2>{heading}</h2>", f'<p class="meta">{caption}{more}</p>',
              _img(grid_png, heading, "preview-grid", min_width=800)]
    if not from_tokens:
        stats = summary["psnr_db"]
        parts += [
            "<h2>Reconstruction PSNR</h2>", '<div class="stats">',
            _stat("mean PSNR (dB)", _fmt_db(stats["mean"]), "psnr-mean"),
            _stat("median PSNR (dB)", _fmt_db(stats["median"]), "psnr-median"),
            _stat("min (dB)", _fmt_db(stats["min"]), "psnr-min"),
            _stat("max (dB)", _fmt_db(stats["max"]), "psnr-max"),
            "</div>",
            f'<p class="meta">peak 255 over RGB uint8; identical images count as '
            f"{PSNR_CAP_DB:g} dB. Worst samples, original | reconstruction:</p>",
            '<div id="worst">',
        ]
        for index, score, pair in worst:
            parts.append(
                f'<figure>{_img(pair, f"sample {index}", min_width=256)}<figcaption>sample '
                f'{index}: <b class="num psnr-sample">{_fmt_db(min(score, PSNR_CAP_DB))}</b> dB'
                "</figcaption></figure>"
            )
        parts.append("</div>")

    # Codebook
    # What a perfectly uniform codebook would show on this many tokens: the used fraction of a
    # small sample is bounded by the sample, not only by the model.
    uniform_used = 1.0 - (1.0 - 1.0 / usage.codebook_size) ** usage.total
    parts += [
        "<h2>Codebook usage</h2>", '<div class="stats">',
        _stat("codes used", f"{usage.used:,} / {usage.codebook_size:,}", "codes-used"),
        _stat("used fraction", f"{usage.used_fraction:.4f}", "used-fraction"),
        _stat("perplexity", f"{usage.perplexity:.2f}", "perplexity"),
        _stat("tokens counted", f"{usage.total:,}", "tokens-counted"),
        "</div>",
        f'<p class="meta">perplexity = exp(entropy of the code distribution), '
        f"{usage.perplexity / usage.codebook_size:.2%} of the codebook size. "
        f"For scale, {usage.total:,} tokens drawn uniformly from the codebook would use "
        f"{uniform_used:.2%} of it.</p>",
        _img(codebook_png, "code frequency by rank", "codebook-plot", css="plot"),
        "<table><tr><th>top codes</th>"
        + "".join(f'<td class="num">{c}</td>' for c, _ in usage.top_codes)
        + "</tr><tr><th>share</th>"
        + "".join(f'<td class="num">{k / usage.total:.2%}</td>' for _, k in usage.top_codes)
        + "</tr></table>",
    ]

    # Throughput
    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:,.1f}"

    parts += [
        "<h2>Throughput</h2>", '<div class="stats">',
        _stat("encode (images/s)", rate(throughput.encode), "encode-rate"),
        _stat("decode (images/s)", rate(throughput.decode), "decode-rate"),
        _stat("devices", f"{throughput.devices} × {e(throughput.device_kind)}", "devices"),
        "</div>",
        f'<p class="meta">measured on these {n} samples at {size}×{size}, global batch '
        f"{throughput.batch_size} ({e(throughput.platform)}); compilation and image "
        "decoding/resizing excluded. A small sample on a large accelerator understates its "
        "rate; see benchmarks/ for steady-state numbers.</p>",
    ]

    # Model identity
    config = dict(spec.config)
    rows = [
        ("name", spec.model_name or "in-memory model"),
        ("revision", spec.revision or "–"),
        ("weights digest", _digest_prefix(spec.weights_digest)),
        ("tokenizer fingerprint", spec.fingerprint()),
        ("codebook", f"{spec.codebook_size:,} codes × {config.get('embed_dim')} dims"),
        ("token grid", f"{spec.grid[0]}×{spec.grid[1]} at {size}×{size} "
                       f"(f{size // spec.grid[0]}), stored as {spec.token_dtype}"),
        ("value range", f"{list(spec.value_range)}"),
        ("compute dtype", spec.compute_dtype),
        ("architecture", ", ".join(f"{k}={config[k]}" for k in (
            "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution")
            if k in config)),
        ("preprocessing", spec.preprocessing),
    ]
    parts += ["<h2>Model</h2>", '<table id="model">']
    parts += [f"<tr><th>{e(k)}</th><td><code>{e(str(v))}</code></td></tr>" for k, v in rows]
    parts += ["</table>", "</body></html>"]
    return "\n".join(parts)


# -- files ----------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)
