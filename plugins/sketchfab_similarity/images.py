"""Image decoding shared by the download (validation) and extraction (model input) stages.

Both stages must agree on what a valid image is, so the rules live here once:
a pixel cap checked from the header before decoding, a full decode, EXIF
orientation applied, and every mode (CMYK, greyscale, palette, alpha) turned into RGB.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("squash", "center_crop")


class ImageRejected(ValueError):
    """The bytes are not an image we accept. The message is the recorded reason."""


ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
"""Formats a thumbnail may have. Pillow tries only these decoders, which also keeps its rarely used
parsers away from untrusted bytes."""
EXIF_ORIENTATION = 0x0112


def open_checked(data: bytes, max_pixels: int, formats: tuple[str, ...] = ALLOWED_FORMATS) -> Image.Image:
    """Open and fully decode, refusing empty, non-image, truncated and oversized images.

    Reasons read "<kind>: <detail>" so failures can be counted by kind.
    """
    if not data:
        raise ImageRejected("empty file: 0 bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:  # Pillow's own, larger cap (checked from the header)
        raise ImageRejected(f"decompression bomb: {exc}") from None
    except Exception as exc:
        raise ImageRejected(f"not a decodable image ({', '.join(formats)}): {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(
            f"too many pixels: image is {width}x{height} = {width * height} pixels, over the {max_pixels} cap"
        )
    try:
        img.load()
    except Exception as exc:
        raise ImageRejected(f"truncated or corrupt image: {exc}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation; flatten alpha onto white; scale 16-bit greyscale; convert any mode to RGB.

    Returns the image itself when it is already an upright RGB image (no copy on the common path).
    """
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):  # 16-bit greyscale PNGs: scale to 8 bits instead of clipping to white
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray((wide >> 8).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_for_model(img: Image.Image, size: int, mode: str = "squash") -> Image.Image:
    """`squash` is the original post's behaviour (whole 16:9 frame to a square); `center_crop` keeps aspect."""
    if mode == "center_crop":
        return ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)
    if mode != "squash":
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    return img.resize((size, size), Image.Resampling.BILINEAR)


def decode_for_model(
    data: bytes, size: int, mode: str = "squash", max_pixels: int = 40_000_000
) -> np.ndarray:
    """Bytes -> float32 RGB array (size, size, 3) in 0..255, ready for VGG16 preprocessing."""
    img = open_checked(data, max_pixels)
    if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
        # Reopen with JPEG DCT-domain downscaling: exact enough and several times faster.
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size, size))
    rgb = to_rgb(img)
    return np.asarray(resize_for_model(rgb, size, mode), dtype=np.float32)
