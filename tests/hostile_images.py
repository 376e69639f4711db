"""A corpus of hostile thumbnails, each with the verdict both image paths must reach.

None means the image is accepted (decoded, converted to RGB); a string is the start of the
reason it is refused. Header-only PNGs have huge dimensions in a file of a few hundred bytes.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int, bit_depth: int = 8, colour_type: int = 6) -> bytes:
    """A PNG that declares width x height but carries only the first few rows of zeros."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + chunk(b"IEND", b"")
    )


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.html", "<script>alert(1)</script>")
    return buf.getvalue()


def corpus() -> dict[str, tuple[str, bytes, str | None]]:
    """name -> (content type, bytes, None if accepted else the start of the refusal reason)."""
    photo = Image.fromarray(_noise(90, 160))
    frames = [Image.fromarray(_noise(36, 64, seed)) for seed in range(3)]
    grey16 = Image.fromarray((np.arange(64 * 36).reshape(36, 64) * 28).astype(np.uint16))
    palette = Image.new("P", (64, 36), 0)
    palette.info["transparency"] = 0
    odd_icc = b"\x00\x00\x02\x00garbage-icc" + bytes(range(256)) * 2
    cmyk = Image.new("CMYK", (64, 36), (0, 255, 255, 0))
    jpeg = encode(photo)
    return {
        "polyglot_jpeg_zip": ("image/jpeg", jpeg + _zip(), None),
        "polyglot_png_html": ("image/png", encode(photo, "PNG") + b"<html><script>alert(1)</script></html>", None),
        "html_named_gif": ("image/gif", b"GIF89a<html><script>alert(1)</script></html>", "not a decodable image"),
        "zip_named_jpeg": ("image/jpeg", _zip(), "not a decodable image"),
        "animated_png": ("image/png", encode(frames[0], "PNG", save_all=True, append_images=frames[1:]), None),
        "animated_webp": ("image/webp", encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]), None),
        "grey_16bit_png": ("image/png", encode(grey16, "PNG"), None),
        "cmyk_jpeg_odd_icc": ("image/jpeg", encode(cmyk, icc_profile=odd_icc), None),
        "progressive_jpeg": ("image/jpeg", encode(photo, progressive=True, optimize=True), None),
        "palette_with_transparency": ("image/png", encode(palette, "PNG"), None),
        "huge_dimension_tiny_png": ("image/png", png_header_only(30_000, 30_000), "decompression bomb"),
        "36mpx_rgba_tiny_png": ("image/png", png_header_only(6_000, 6_000), "too many pixels"),
        "16mpx_rgba_tiny_png": ("image/png", png_header_only(4_000, 4_000), "too costly to decode"),
        "16mpx_16bit_tiny_png": ("image/png", png_header_only(4_000, 4_000, 16, 0), "too costly to decode"),
        "9mpx_rgb_truncated_png": ("image/png", png_header_only(3_000, 3_000, 8, 2), "truncated or corrupt"),
        "truncated_jpeg": ("image/jpeg", jpeg[: len(jpeg) // 2], "truncated or corrupt"),
        "empty": ("image/jpeg", b"", "empty file"),
    }  # fmt: skip
