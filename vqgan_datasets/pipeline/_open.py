"""Opening image files: the size a header declares (for messages), what a file starts with, and
PNG files that PIL refuses for the size of their metadata, whose pixels are read without it.

PIL decompresses every iCCP, zTXt and iTXt chunk while it opens a PNG and refuses the file when
one holds more than ``PngImagePlugin.MAX_TEXT_CHUNK`` bytes (1 MiB), or all text more than
``MAX_TEXT_MEMORY`` (64 MiB): a limit against decompression bombs, which also refuses a photo
with a large embedded ICC profile or comment. Such a file is decoded again with those chunks
(and tEXt) left out, never decompressed: PIL's limits stay as they are. The pixels are the
same (colour profiles are not applied anywhere in this pipeline); the copy costs the size of
the encoded file.
"""

from __future__ import annotations

import io
import os
import struct
from typing import IO

from PIL import Image

__all__ = ["declared_size", "describe_bytes", "refused_for_metadata", "without_metadata"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_METADATA = frozenset({b"iCCP", b"zTXt", b"iTXt", b"tEXt"})
# PIL's messages for its two text limits (PngImagePlugin._safe_zlib_decompress and
# check_text_memory, in Pillow 13).
_LIMIT_MESSAGES = ("MAX_TEXT_CHUNK", "Too much memory used in text chunks")


def refused_for_metadata(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is PIL refusing a PNG's text or ICC chunks by size."""
    for _ in range(8):  # a short chain of causes
        if error is None:
            return False
        if isinstance(error, ValueError) and any(m in str(error) for m in _LIMIT_MESSAGES):
            return True
        error = error.__cause__
    return False


def without_metadata(fp: IO[bytes]) -> io.BytesIO | None:
    """The PNG in `fp` with its iCCP, zTXt, iTXt and tEXt chunks left out (None when `fp` is
    not a PNG); `fp` is rewound. Every other chunk is copied byte for byte, up to IEND."""
    fp.seek(0)
    data = fp.read()
    fp.seek(0)
    if not data.startswith(_SIGNATURE):
        return None
    kept, position = [_SIGNATURE], len(_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        end = position + 12 + length  # length, type, data, CRC
        if kind not in _METADATA:
            kept.append(data[position:end])
        position = end
        if kind == b"IEND":
            break
    return io.BytesIO(b"".join(kept))


def declared_size(fp: IO[bytes]) -> tuple[int, int] | None:
    """Header size of a file PIL refused to open, for the error message only.

    Runs the format plugins' header parsers as Image.open does, minus its bomb check;
    nothing is decoded.
    """
    try:
        fp.seek(0)
        prefix = fp.read(16)
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            accepted = not accept or accept(prefix)
            if not accepted or isinstance(accepted, str):
                continue
            fp.seek(0)
            try:
                return factory(fp, "").size
            except Exception:
                continue
    except Exception:
        return None
    return None


def describe_bytes(fp: IO[bytes]) -> str:
    """A file's size and first bytes, for the message of a file nothing could identify."""
    try:
        size = fp.seek(0, os.SEEK_END)
        fp.seek(0)
        return f"{size} bytes, starts with {fp.read(16)!r}"
    except Exception:
        return "unreadable"
