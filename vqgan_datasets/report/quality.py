"""Reconstruction and codebook metrics: PSNR of uint8 images, codebook usage and perplexity.

Plain numpy, no model and no plotting, so they run anywhere (on arrays from any pipeline);
the HTML report (report.py) summarises and draws them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["PSNR_CAP_DB", "CodebookUsage", "codebook_usage", "psnr"]

# Identical images have infinite PSNR. `psnr` returns inf (exact); summaries (mean, median)
# count such images as PSNR_CAP_DB so that one perfect sample does not make the mean infinite.
PSNR_CAP_DB = 100.0


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images [..., H, W, C] (peak 255); identical images → inf.

    Reduces over the last three axes: [N, H, W, C] gives [N], one [H, W, C] image gives a 0-d
    array. Infinite values are exact; `PSNR_CAP_DB` is what the report's summaries use instead.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"psnr expects uint8 images, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape or a.ndim < 3:
        raise ValueError(f"psnr expects two [..., H, W, C] arrays of one shape, got {a.shape} "
                         f"and {b.shape}")
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = np.mean(diff * diff, axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / mse)


@dataclasses.dataclass(frozen=True)
class CodebookUsage:
    """How a sample of tokens uses a codebook.

    `perplexity` is exp(entropy) of the code distribution (natural log): the number of equally
    used codes that would give the same entropy, between 1 and `codebook_size`.
    """

    codebook_size: int
    counts: np.ndarray  # int64 [codebook_size]: occurrences of each code id
    total: int  # tokens counted
    used: int  # codes that occur at least once
    used_fraction: float  # used / codebook_size
    entropy: float  # nats
    perplexity: float
    top_codes: list[tuple[int, int]]  # (code, count), most frequent first

    def to_dict(self) -> dict[str, Any]:
        """Everything but the full histogram, JSON-ready."""
        return {
            "codebook_size": self.codebook_size,
            "tokens": self.total,
            "used": self.used,
            "used_fraction": self.used_fraction,
            "entropy_nats": self.entropy,
            "perplexity": self.perplexity,
            "top_codes": [list(pair) for pair in self.top_codes],
        }


def codebook_usage(codes: Any, codebook_size: int, *, top: int = 10) -> CodebookUsage:
    """Histogram, used fraction, perplexity and the `top` most frequent codes of integer `codes`
    (any shape, e.g. [N, h*w]); ids outside [0, codebook_size) raise."""
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, (int, np.integer)) \
            or codebook_size < 1:
        raise ValueError(f"codebook_size must be a positive int, got {codebook_size!r}")
    flat = np.asarray(codes).reshape(-1)
    if flat.size == 0:
        raise ValueError("codebook_usage needs at least one token, got an empty array")
    if not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {flat.dtype}")
    low, high = int(flat.min()), int(flat.max())
    if low < 0 or high >= codebook_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside [0, {codebook_size})")
    counts = np.bincount(flat.astype(np.int64), minlength=int(codebook_size)).astype(np.int64)
    total = int(flat.size)
    p = counts[counts > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    order = np.argsort(-counts, kind="stable")[: max(0, int(top))]
    return CodebookUsage(
        codebook_size=int(codebook_size),
        counts=counts,
        total=total,
        used=int((counts > 0).sum()),
        used_fraction=float((counts > 0).sum() / codebook_size),
        entropy=entropy,
        perplexity=float(math.exp(entropy)),
        top_codes=[(int(c), int(counts[c])) for c in order if counts[c] > 0],
    )
