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

MAX_DECODE_BYTES = 128 * 2**20
"""Default memory budget of decoding one image (Settings.max_image_decode_bytes)."""
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def decode_cost(mode: str, width: int, height: int) -> int:
    """Bytes that decoding and converting an image to RGB takes at its peak, from its header alone.

    The decoded pixels, plus what `to_rgb` allocates next to them: an RGBA copy, a white
    background and the composite for images with alpha; a 32-bit copy and an 8-bit result for
    16-bit images; the RGB result for everything. Pixel counts alone hide a factor of five:
    a 100 kB PNG of 5000x5000 RGBA costs 375 MB, an RGB JPEG of the same size 75 MB.
    """
    pixels = width * height
    decoded = _MODE_BYTES.get(mode, 3 if mode in ("RGB", "YCbCr", "LAB", "HSV") else 4)
    extra = 0
    if mode in _ALPHA_MODES or mode == "P":
        extra = 3 * 4  # RGBA conversion, background, composite (palette images may carry transparency)
    elif mode.startswith("I") or mode == "F":
        extra = 4 + 1
    return pixels * (decoded + extra + 3)


def _check_size(img: Image.Image, max_pixels: int, max_bytes: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(
            f"too many pixels: image is {width}x{height} = {width * height} pixels, over the {max_pixels} cap"
        )
    cost = decode_cost(img.mode, width, height)
    if cost > max_bytes:
        raise ImageRejected(
            f"too costly to decode: {width}x{height} {img.mode} needs about {cost // 2**20} MiB, over the "
            f"{max_bytes // 2**20} MiB budget"
        )


def open_checked(
    data: bytes,
    max_pixels: int,
    formats: tuple[str, ...] = ALLOWED_FORMATS,
    max_bytes: int = MAX_DECODE_BYTES,
) -> Image.Image:
    """Open and fully decode, refusing empty, non-image, truncated and oversized images.

    Size is checked from the header, before any pixel is decoded: pixels against `max_pixels`,
    and the decode's memory (`decode_cost`) against `max_bytes`, so a tiny file cannot cost GBs.

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
    _check_size(img, max_pixels, max_bytes)
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
        wide = np.clip(np.asarray(img), 0, 65535)  # uint16 or int32 as decoded: no wider copy
        img = Image.fromarray((wide >> 8).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB") if img.mode != "RGB" else img


# Names and filters exactly as keras.utils.load_img takes them, so both paths can be set alike.
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}
JPEG_DECODES = ("reduced", "full")
# Reduced JPEG decoding stops at >= REDUCING_GAP x the input size, so the final resize still
# filters; Pillow documents a gap of 3 as indistinguishable from full decoding in most cases.
# On the test photographs a gap of 2 fell to cosine 0.988 against full decoding at 64 px inputs;
# 3 stays >= 0.99 at every size tested. Nearest samples single pixels, so it always decodes in full.
REDUCING_GAP = 3


def effective_jpeg_decode(interpolation: str, jpeg_decode: str) -> str:
    """`reduced` is only exact enough when the resize filters; with `nearest` we decode in full."""
    return "full" if interpolation == "nearest" else jpeg_decode


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square, with load_img(keep_aspect_ratio=True)'s integer arithmetic."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def resize_for_model(
    img: Image.Image, size: int, mode: str = "squash", interpolation: str = "bilinear"
) -> Image.Image:
    """`squash` is the original post's behaviour (whole 16:9 frame to a square); `center_crop` keeps aspect.

    Pixel for pixel what keras.utils.load_img(target_size=(size, size), interpolation=...,
    keep_aspect_ratio=mode == "center_crop") does after decoding.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {interpolation!r}")
    if img.size == (size, size):
        return img
    box = center_crop_box(*img.size) if mode == "center_crop" else None
    return img.resize((size, size), INTERPOLATIONS[interpolation], box=box)


def open_reduced(data: bytes, size: int, max_pixels: int, max_bytes: int = MAX_DECODE_BYTES) -> Image.Image:
    """Like open_checked, but a JPEG is decoded in the DCT domain at 1/2, 1/4 or 1/8 scale while
    both sides stay >= REDUCING_GAP x size: the decoder averages instead of the resize, and it is faster."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb: {exc}") from None
    except Exception as exc:
        raise ImageRejected(f"not a decodable image: {exc}") from None
    if img.format not in ALLOWED_FORMATS:
        raise ImageRejected(f"not a decodable image ({', '.join(ALLOWED_FORMATS)}): {img.format}")
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(
            f"too many pixels: image is {width}x{height} = {width * height} pixels, over the {max_pixels} cap"
        )
    if img.format == "JPEG":
        img.draft(None, (REDUCING_GAP * size, REDUCING_GAP * size))
    _check_size(img, max_pixels, max_bytes)  # after draft: a reduced JPEG decodes fewer pixels
    try:
        img.load()
    except Exception as exc:
        raise ImageRejected(f"truncated or corrupt image: {exc}") from None
    return img


def decode_for_model(
    data: bytes,
    size: int,
    mode: str = "squash",
    interpolation: str = "bilinear",
    jpeg_decode: str = "reduced",
    max_pixels: int = 16_777_216,
    max_bytes: int = MAX_DECODE_BYTES,
) -> np.ndarray:
    """Bytes -> float32 RGB array (size, size, 3) in 0..255, ready for VGG16 preprocessing.

    jpeg_decode="full" decodes every pixel, so with the same mode and interpolation the
    result equals keras.utils.load_img's for upright opaque images; "reduced" is the fast path.
    """
    if jpeg_decode not in JPEG_DECODES:
        raise ValueError(f"jpeg_decode must be one of {JPEG_DECODES}, got {jpeg_decode!r}")
    if effective_jpeg_decode(interpolation, jpeg_decode) == "reduced":
        img = open_reduced(data, size, max_pixels, max_bytes)
    else:
        img = open_checked(data, max_pixels, max_bytes=max_bytes)
    return np.asarray(resize_for_model(to_rgb(img), size, mode, interpolation), dtype=np.float32)
