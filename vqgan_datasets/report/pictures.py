"""The report's pictures: preview grids of originals above reconstructions, tile grids, and the
codebook-usage plot, as PIL images or PNG bytes.

Grids are plain numpy/PIL; only `codebook_plot` needs matplotlib (the `[report]` extra), imported
when it is called.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from .quality import CodebookUsage

__all__ = ["codebook_plot", "png_bytes", "preview_grid", "side_by_side", "tile_grid"]

_GRID_COLUMNS = 8  # default columns of a preview grid
_WHITE = 255


def preview_grid(
    originals: np.ndarray,
    reconstructions: np.ndarray,
    *,
    columns: int | None = None,
    gap: int = 2,
) -> Image.Image:
    """Originals in a row above their reconstructions, `columns` samples per row pair
    (default min(N, 8)), on white.

    Geometry, for tiles H×W and P = ceil(N / columns) row pairs: the image is
    (columns·(W+gap)+gap) × P·(2H+3·gap); sample i's original has its top-left corner at
    x = gap + (i % columns)·(W+gap), y = gap + (i // columns)·(2H+3·gap), and its reconstruction
    H+gap below. Row pairs are 2·gap apart, twice the gap inside a pair.
    """
    originals = _check_tiles("originals", originals)
    reconstructions = _check_tiles("reconstructions", reconstructions)
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals {originals.shape} and reconstructions "
                         f"{reconstructions.shape} differ in shape")
    n, h, w, _ = originals.shape
    columns = _columns(n, columns)
    _check_gap(gap)
    pairs = -(-n // columns)
    canvas = np.full((pairs * (2 * h + 3 * gap), columns * (w + gap) + gap, 3), _WHITE, np.uint8)
    for i in range(n):
        x = gap + (i % columns) * (w + gap)
        y = gap + (i // columns) * (2 * h + 3 * gap)
        canvas[y : y + h, x : x + w] = originals[i]
        canvas[y + h + gap : y + 2 * h + gap, x : x + w] = reconstructions[i]
    return Image.fromarray(canvas)


def tile_grid(tiles: np.ndarray, columns: int | None = None, gap: int = 2) -> Image.Image:
    """Images in rows of `columns` on white (decoded tokens, with no originals to pair)."""
    tiles = _check_tiles("images", tiles)
    n, h, w, _ = tiles.shape
    columns = _columns(n, columns)
    rows = -(-n // columns)
    canvas = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), _WHITE, np.uint8)
    for i in range(n):
        x = gap + (i % columns) * (w + gap)
        y = gap + (i // columns) * (h + gap)
        canvas[y : y + h, x : x + w] = tiles[i]
    return Image.fromarray(canvas)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 2) -> Image.Image:
    """Two [H, W, 3] uint8 images of one shape, `gap` white columns apart (an original and its
    reconstruction)."""
    h, w, _ = left.shape
    canvas = np.full((h, 2 * w + gap, 3), _WHITE, np.uint8)
    canvas[:, :w] = left
    canvas[:, w + gap :] = right
    return Image.fromarray(canvas)


def codebook_plot(usage: CodebookUsage) -> bytes:
    """PNG of code frequency by rank (log scale, perplexity marked) beside the cumulative share
    of tokens against the fraction of the codebook."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display
    except ImportError as e:
        raise ImportError("the report's plots need matplotlib: pip install "
                          "'vqgan-datasets[report]'") from e
    ranked = np.sort(usage.counts)[::-1]
    used = ranked[ranked > 0]
    rank = np.arange(1, len(used) + 1)
    fig = Figure(figsize=(10, 3.6), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    left.fill_between(rank, used / usage.total, step="mid", alpha=0.35, color="C0")
    left.step(rank, used / usage.total, where="mid", color="C0", linewidth=1)
    left.set_yscale("log")
    left.set_xlim(0.5, usage.codebook_size + 0.5)
    left.axvline(usage.perplexity, color="C3", linestyle="--", linewidth=1,
                 label=f"perplexity {usage.perplexity:,.1f}")
    left.set_xlabel("code rank (most frequent first)")
    left.set_ylabel("share of tokens")
    left.set_title(f"code frequency by rank: {usage.used:,} of {usage.codebook_size:,} used")
    left.legend(loc="upper right")
    cumulative = np.concatenate([[0.0], np.cumsum(used) / usage.total])
    right.plot(np.arange(len(cumulative)) / usage.codebook_size, cumulative, color="C1")
    right.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="uniform")
    right.set_xlim(0, 1)
    right.set_ylim(0, 1.02)
    right.set_xlabel("fraction of codebook (most frequent first)")
    right.set_ylabel("cumulative share of tokens")
    right.set_title(f"{usage.total:,} tokens")
    right.legend(loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    """`image` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _check_tiles(name: str, array: Any) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or not len(array):
        raise ValueError(f"{name} must be uint8 RGB images [N>0, H, W, 3], got {array.dtype} "
                         f"{array.shape}")
    return array


def _columns(n: int, columns: int | None) -> int:
    if columns is None:
        return min(n, _GRID_COLUMNS)
    if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or columns < 1:
        raise ValueError(f"columns must be a positive int, got {columns!r}")
    return int(columns)


def _check_gap(gap: int) -> None:
    if isinstance(gap, bool) or not isinstance(gap, (int, np.integer)) or gap < 0:
        raise ValueError(f"gap must be an int >= 0, got {gap!r}")
