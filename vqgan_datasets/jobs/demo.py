"""`vqgan-datasets demo`: the offline quickstart, on the demo model and the sample photos that
are installed with the package (package data, so that a wheel runs it from any directory)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .commands import decode, encode, preview

__all__ = ["DEMO_IMAGES", "DEMO_MODEL", "demo"]

DEMO_MODEL = Path(__file__).resolve().parents[1] / "_demo" / "model"
DEMO_IMAGES = Path(__file__).resolve().parents[1] / "_demo" / "images"


def demo(
    output_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize the sample photos with the demo model into a datasets directory, decode them
    back, and write a preview grid; no network needed."""
    out = Path(output_dir)
    model_dir = Path(model) if model is not None else DEMO_MODEL
    image_dir = Path(images) if images is not None else DEMO_IMAGES
    for what, path in (("demo checkpoint", model_dir), ("sample images", image_dir)):
        if not path.is_dir():
            raise FileNotFoundError(
                f"{what} not found at {path}: the installed package lacks its data files "
                "(reinstall it), or pass --model/--images"
            )
    encoded = encode(image_dir, out / "tokens", model=str(model_dir), on_error="raise",
                     progress=progress)
    decoded = decode(out / "tokens", out / "decoded")
    grid = preview(image_dir, out / "preview.png", model=str(model_dir), count=encoded["rows_out"])
    return {"tokens": encoded, "decoded": decoded, "preview": str(grid)}
