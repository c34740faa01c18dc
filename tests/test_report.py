"""Report: metrics on known arrays, grid geometry, and a full report on the tiny model whose
HTML is parsed back (numbers recomputed, embedded PNGs decoded)."""

from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import pytest
from conftest import photos
from PIL import Image

from vqgan_datasets.engine import get_engine
from vqgan_datasets.images import load_image
from vqgan_datasets.report import (
    PSNR_CAP_DB,
    build_report,
    codebook_usage,
    preview,
    preview_grid,
    psnr,
)

SIZE = 64
# Every model call below uses 6 samples: one padded bucket (8), so one compile per direction.
COUNT = 6


def six_photos() -> np.ndarray:
    """conftest's first four photos plus two more bundled with scikit-image (conftest's fifth,
    motorcycle_left, is not in skimage.data)."""
    from skimage import data

    extra = [load_image(getattr(data, name)(), SIZE)
             for name in ("immunohistochemistry", "hubble_deep_field")]
    return np.concatenate([photos(SIZE, 4), np.stack(extra)])


# -- metrics ------------------------------------------------------------------------------------


def test_psnr_known_values():
    a = np.full((3, 8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[0] += 1  # MSE 1 → 10·log10(255²) = 48.1308 dB
    b[1] -= 10  # MSE 100 → 28.1308 dB
    out = psnr(a, b)
    assert out.shape == (3,)
    np.testing.assert_allclose(out[:2], [48.1308036, 28.1308036], atol=1e-6)
    assert math.isinf(out[2]) and out[2] > 0  # identical: exact inf, not an error
    assert psnr(a[0], b[0]).shape == ()  # one image
    # Symmetric, and no uint8 wrap-around in the difference.
    np.testing.assert_array_equal(psnr(b, a), out)
    black, white = np.zeros((1, 4, 4, 3), np.uint8), np.full((1, 4, 4, 3), 255, np.uint8)
    np.testing.assert_allclose(psnr(black, white), [0.0], atol=1e-12)


def test_psnr_rejects_bad_inputs():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, a[:1])


def test_codebook_usage_known_codes():
    k, size = 5, 64
    codes = np.tile(np.arange(k), 12).reshape(6, 10)  # uniform over 5 of 64 codes
    usage = codebook_usage(codes, size)
    assert usage.total == 60 and usage.used == k
    assert usage.used_fraction == pytest.approx(k / size)
    assert usage.perplexity == pytest.approx(k)
    assert usage.counts.shape == (size,) and usage.counts[:k].tolist() == [12] * k
    assert usage.counts[k:].sum() == 0

    skewed = codebook_usage(np.array([7, 7, 7, 3]), 8, top=3)
    assert skewed.top_codes == [(7, 3), (3, 1)]  # only codes that occur
    p = np.array([0.75, 0.25])
    assert skewed.perplexity == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert codebook_usage(np.zeros(10, np.uint16), 8).perplexity == pytest.approx(1.0)
    assert json.dumps(skewed.to_dict())


def test_codebook_usage_rejects_bad_codes():
    with pytest.raises(ValueError, match="outside"):
        codebook_usage(np.array([0, 8]), 8)
    with pytest.raises(ValueError, match="outside"):
        codebook_usage(np.array([-1, 2]), 8)
    with pytest.raises(ValueError, match="empty"):
        codebook_usage(np.array([], np.int32), 8)
    with pytest.raises(ValueError, match="integers"):
        codebook_usage(np.array([0.5]), 8)


# -- grid ---------------------------------------------------------------------------------------


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


def test_preview_writes_a_real_picture(tiny_model, tmp_path):
    images = six_photos()
    # Mixed inputs: arrays, a PIL image, PNG bytes (all already at SIZE: nothing is resized).
    buffer = io.BytesIO()
    Image.fromarray(images[2]).save(buffer, format="PNG")
    inputs = [images[0], Image.fromarray(images[1]), buffer.getvalue(), *images[3:]]
    path = preview(tiny_model, inputs, tmp_path / "sub" / "preview.png", columns=3)
    assert path == tmp_path / "sub" / "preview.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        grid = np.asarray(image)
    assert grid.shape == (2 * (2 * SIZE + 6), 3 * (SIZE + 2) + 2, 3)
    engine = get_engine(tiny_model)
    recon = engine.decode(engine.encode(images))
    np.testing.assert_array_equal(grid[2 : 2 + SIZE, 2 : 2 + SIZE], images[0])
    np.testing.assert_array_equal(grid[SIZE + 4 : 2 * SIZE + 4, 2 : 2 + SIZE], recon[0])
    # A real picture: photos have texture (not one flat colour), the gaps are white.
    tile = grid[2 : 2 + SIZE, 2 : 2 + SIZE].astype(float)
    assert tile.std() > 20 and len(np.unique(tile.reshape(-1, 3), axis=0)) > 500
    assert (grid[:, SIZE + 2 : SIZE + 4] == 255).all()
    assert not (recon == recon[:, :1, :1]).all()  # reconstructions are not flat either


# -- the report ---------------------------------------------------------------------------------


def _by_id(page: str, id_: str) -> str:
    match = re.search(rf'id="{id_}"[^>]*>([^<]*)<', page)
    assert match, f"no element with id {id_!r} in the report"
    return match.group(1)


def _png_of(page: str, id_: str) -> np.ndarray:
    match = re.search(rf'<img id="{id_}"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match, f"no embedded PNG with id {id_!r}"
    with Image.open(io.BytesIO(base64.b64decode(match.group(1)))) as image:
        assert image.format == "PNG"
        return np.asarray(image)


@pytest.fixture(scope="module")
def report(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    images = six_photos()
    path = build_report(tiny_model, images, out_dir=out, title="Tiny <model> & co")
    return path, images


def test_build_report_from_images(report, tiny_model):
    path, images = report
    assert path.name == "report.html"
    page = path.read_text("utf-8")
    # Self-contained: every image inline, nothing fetched.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<title>Tiny &lt;model&gt; &amp; co</title>" in page  # escaped user text
    assert _by_id(page, "title") == "Tiny &lt;model&gt; &amp; co"

    engine = get_engine(tiny_model)
    codes = engine.encode(images)
    recon = engine.decode(codes)
    scores = psnr(images, recon)
    assert np.isfinite(scores).all()
    assert _by_id(page, "psnr-mean") == f"{scores.mean():.2f}"
    assert _by_id(page, "psnr-median") == f"{np.median(scores):.2f}"
    worst = re.findall(r'class="num psnr-sample">([^<]+)<', page)
    assert worst == [f"{s:.2f}" for s in np.sort(scores)[:4]]

    usage = codebook_usage(codes, tiny_model.config.n_embed)
    assert _by_id(page, "used-fraction") == f"{usage.used_fraction:.4f}"
    assert _by_id(page, "perplexity") == f"{usage.perplexity:.2f}"
    assert 1 <= usage.perplexity <= usage.used
    for id_ in ("encode-rate", "decode-rate"):
        assert float(_by_id(page, id_).replace(",", "")) > 0
    assert "images/s" in page
    assert _by_id(page, "devices").startswith("1 × ")  # conftest: one CPU device here

    grid = _png_of(page, "preview-grid")
    np.testing.assert_array_equal(grid[2 : 2 + SIZE, 2 : 2 + SIZE], images[0])
    np.testing.assert_array_equal(grid[SIZE + 4 : 2 * SIZE + 4, 2 : 2 + SIZE], recon[0])
    plot = _png_of(page, "codebook-plot")
    assert plot.shape[0] > 200 and plot.std() > 10  # a drawn figure, not a blank canvas
    for match in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        Image.open(io.BytesIO(base64.b64decode(match))).verify()

    # Model identity, and the files next to the report.
    assert tiny_model.weights_digest.split(":")[-1][:16] in page
    assert "value range" in page and "[-1.0, 1.0]" in page
    for name in ("preview.png", "codebook.png"):
        with Image.open(path.parent / name) as image:
            assert image.format == "PNG"
    summary = json.loads((path.parent / "summary.json").read_text())
    np.testing.assert_allclose(summary["psnr_db"]["per_sample"], scores)
    assert summary["codebook"]["used"] == usage.used and summary["samples"] == COUNT
    assert summary["psnr_db"]["cap"] == PSNR_CAP_DB


def test_build_report_from_tokens(tiny_model, tmp_path):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 8, (COUNT + 2, (SIZE // 4) ** 2)).astype(np.uint16)
    column = [list(map(int, row)) for row in tokens]  # as a datasets column gives them
    path = build_report(tiny_model, tokens=iter(column), out_dir=tmp_path, max_samples=COUNT)
    page = path.read_text("utf-8")
    usage = codebook_usage(tokens[:COUNT], tiny_model.config.n_embed)
    assert _by_id(page, "used-fraction") == f"{usage.used_fraction:.4f}" == "0.1250"
    assert _by_id(page, "encode-rate") == "n/a"
    assert "psnr-mean" not in page
    grid = _png_of(page, "preview-grid")
    decoded = get_engine(tiny_model).decode(tokens[:COUNT])
    np.testing.assert_array_equal(grid[2 : 2 + SIZE, 2 : 2 + SIZE], decoded[0])
    assert grid.shape == (SIZE + 4, COUNT * (SIZE + 2) + 2, 3)


def test_build_report_argument_errors(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        build_report(tiny_model, out_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        build_report(tiny_model, photos(SIZE, 1), tokens=np.zeros((1, 256), int), out_dir=tmp_path)
    with pytest.raises(ValueError, match="integer ids"):
        build_report(tiny_model, tokens=np.zeros((2,), int), out_dir=tmp_path)
