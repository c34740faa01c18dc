"""Report: a preview PNG and a full report on the tiny model whose HTML is parsed back (numbers
recomputed, embedded PNGs decoded). The metrics and grids have their own test files."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from conftest import photos
from PIL import Image

from vqgan_datasets.pipeline.engine import get_engine
from vqgan_datasets.pipeline.images import load_image
from vqgan_datasets.report import build as report_module
from vqgan_datasets.report import pictures, quality
from vqgan_datasets.report.build import (
    PSNR_CAP_DB,
    build_report,
    codebook_usage,
    preview,
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


def test_report_reexports_metrics_and_grid():
    assert report_module.psnr is quality.psnr
    assert report_module.codebook_usage is quality.codebook_usage
    assert report_module.CodebookUsage is quality.CodebookUsage
    assert report_module.PSNR_CAP_DB == quality.PSNR_CAP_DB
    assert report_module.preview_grid is pictures.preview_grid


# -- preview --------------------------------------------------------------------------------


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
