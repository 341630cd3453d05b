"""Read an image file's header once: its size, and whether both decoders can handle it.

Index building calls `probe_image` on every file, so it must stay cheap: it parses the header
(PIL's lazy `Image.open`) and checks the file's end marker, and decodes pixels only when asked
(`full=True`, used by `fastkd data check --full`). The decision is made on the container format
(from the bytes, not the extension), so a PNG or WebP named `.JPEG` is kept and decoded as what
it is, while a truncated file, a zero-byte file or a text file is excluded before a decoder
could stop the run on it.
"""
from __future__ import annotations

import os
import struct
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

# Formats that PIL (torch fallback) and DALI's decoders (CPU and nvJPEG) both decode to RGB.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})
_TAIL_BYTES = 4096   # a JPEG's end-of-image marker may be followed by a little padding


class Probe(NamedTuple):
    """Result of probing one file: `problem` is None for a usable image."""
    height: int
    width: int
    format: str | None
    problem: str | None


def _bad(problem: str, fmt: str | None = None) -> Probe:
    return Probe(0, 0, fmt, problem)


def _read_tail(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, size - _TAIL_BYTES))
        return f.read()


def _truncation(path: str, fmt: str, size: int) -> str | None:
    """A reason when the file ends before its format's end marker (cut-off downloads)."""
    if fmt == "JPEG":
        # 0xFFD9 cannot occur inside entropy-coded data (0xFF is byte-stuffed there).
        if b"\xff\xd9" not in _read_tail(path, size):
            return "truncated JPEG (no end-of-image marker)"
    elif fmt == "PNG":
        if b"IEND" not in _read_tail(path, size)[-64:]:
            return "truncated PNG (no IEND chunk)"
    elif fmt == "WEBP":
        with open(path, "rb") as f:
            header = f.read(12)
        riff_size = struct.unpack("<I", header[4:8])[0] if len(header) >= 8 else 0
        if riff_size + 8 > size:
            return "truncated WebP (RIFF size past the end of the file)"
    return None


def probe_image(path: str, full: bool = False) -> Probe:
    """Size and format of an image, or the reason it cannot be used."""
    try:
        size = os.path.getsize(path)
    except OSError as err:
        return _bad(f"unreadable ({err.strerror or err})")
    if size == 0:
        return _bad("empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            fmt, (width, height) = img.format, img.size
            if fmt == "MPO":
                # A camera's multi-picture JPEG (extra frames appended); both decoders read
                # the first frame, the one PIL reports the size of.
                fmt = "JPEG"
            if fmt not in SUPPORTED_FORMATS:
                return _bad(f"unsupported format {fmt}", fmt)
            if width <= 0 or height <= 0:
                return _bad("image with no pixels", fmt)
            problem = _truncation(path, fmt, size)
            if problem is None and full:
                img.convert("RGB").load()
    except UnidentifiedImageError:
        return _bad("not an image")
    except (OSError, SyntaxError, ValueError, struct.error) as err:
        return _bad(f"undecodable ({err})")
    if problem:
        return _bad(problem, fmt)
    return Probe(height, width, fmt, None)
