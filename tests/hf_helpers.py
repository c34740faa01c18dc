"""Constants and helpers shared by the test_hf*.py files (their fixtures are in hf_fixtures)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import TINY
from PIL import Image as PILImage

REPO = Path(__file__).resolve().parents[1]
SIZE = TINY.resolution  # 64: 16×16 tokens
N = 6


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(array).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def image_rows(pictures) -> list[dict]:
    return [{"bytes": encode(a, "PNG" if i % 2 else "JPEG"), "path": None}
            for i, a in enumerate(pictures)]


def tokens_of(dataset, column="vqgan_tokens") -> np.ndarray:
    return np.asarray(dataset.with_format("numpy", dtype=np.uint8)[column])


def run_python(script: str, *args: str, env_extra: dict | None = None, timeout: float = 240):
    """`python -c script args` offline on CPU, with the repo and tests importable."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
