"""Pictures: grid geometry checked pixel by pixel, and PNG encoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vqgan_datasets.report.pictures import png_bytes, preview_grid, side_by_side, tile_grid


def test_preview_grid_geometry():
    rng = np.random.default_rng(0)
    n, h, w, gap, columns = 5, 6, 7, 2, 3
    originals = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    recon = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    grid = np.asarray(preview_grid(originals, recon, columns=columns, gap=gap))
    pairs = 2
    assert grid.shape == (pairs * (2 * h + 3 * gap), columns * (w + gap) + gap, 3)
    np.testing.assert_array_equal(grid[gap : gap + h, gap : gap + w], originals[0])
    below = gap + h + gap
    np.testing.assert_array_equal(grid[below : below + h, gap : gap + w], recon[0])
    # Sample 4 wraps to the second row pair, second column.
    x, y = gap + (w + gap), gap + (2 * h + 3 * gap)
    np.testing.assert_array_equal(grid[y : y + h, x : x + w], originals[4])
    np.testing.assert_array_equal(grid[y + h + gap : y + 2 * h + gap, x : x + w], recon[4])
    # Gaps and the empty last cell are white.
    assert (grid[:gap] == 255).all() and (grid[:, :gap] == 255).all()
    x = gap + 2 * (w + gap)
    assert (grid[y : y + 2 * h + gap, x : x + w] == 255).all()

    default = preview_grid(originals, recon)  # one row pair of min(N, 8) columns
    assert default.size == (n * (w + 2) + 2, 2 * h + 6)
    with pytest.raises(ValueError, match="differ"):
        preview_grid(originals, recon[:4])
    with pytest.raises(ValueError, match="uint8"):
        preview_grid(originals.astype(np.float32), recon)


def test_tile_grid_and_side_by_side_geometry():
    rng = np.random.default_rng(1)
    n, h, w, gap, columns = 5, 4, 6, 3, 2
    tiles = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    grid = np.asarray(tile_grid(tiles, columns, gap))
    assert grid.shape == (3 * (h + gap) + gap, columns * (w + gap) + gap, 3)
    x, y = gap + (w + gap), gap + (h + gap)  # sample 3: second row, second column
    np.testing.assert_array_equal(grid[y : y + h, x : x + w], tiles[3])
    assert (grid[-(h + gap) :, x : x + w] == 255).all()  # the empty last cell is white
    assert tile_grid(tiles).size == (n * (w + 2) + 2, h + 4)  # one row of min(N, 8)
    with pytest.raises(ValueError, match="columns"):
        tile_grid(tiles, 0)

    pair = np.asarray(side_by_side(tiles[0], tiles[1], gap))
    assert pair.shape == (h, 2 * w + gap, 3)
    np.testing.assert_array_equal(pair[:, :w], tiles[0])
    np.testing.assert_array_equal(pair[:, w + gap :], tiles[1])
    assert (pair[:, w : w + gap] == 255).all()


def test_png_bytes_round_trips():
    tiles = np.random.default_rng(2).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    data = png_bytes(tile_grid(tiles))
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        np.testing.assert_array_equal(np.asarray(image), np.asarray(tile_grid(tiles)))
