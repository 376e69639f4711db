import io

import numpy as np
import pytest
from PIL import Image
from sketchfab_similarity.images import ImageRejected, decode_for_model, open_checked, to_rgb
from sketchfab_similarity.thumbnails import choose_thumbnail


def encode(img, fmt="JPEG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rejects_empty_html_truncated_and_huge():
    noise = np.random.default_rng(0).integers(0, 255, (360, 640, 3), dtype=np.uint8)
    good = encode(Image.fromarray(noise))
    with pytest.raises(ImageRejected, match="empty"):
        open_checked(b"", 10**6)
    with pytest.raises(ImageRejected, match="not a decodable image"):
        open_checked(b"<html>502 Bad Gateway</html>", 10**6)
    with pytest.raises(ImageRejected, match="truncated or corrupt"):
        open_checked(good[: len(good) // 2], 10**6)
    with pytest.raises(ImageRejected, match="640x360 = 230400 pixels, over the 1000 cap"):
        open_checked(good, 1000)


def test_modes_become_rgb():
    for img in [
        Image.new("L", (8, 8), 128),
        Image.new("CMYK", (8, 8), (0, 255, 255, 0)),
        Image.new("RGBA", (8, 8), (255, 0, 0, 0)),
        Image.new("P", (8, 8)),
    ]:
        assert to_rgb(img).mode == "RGB"
    # Fully transparent pixels are flattened onto white, not black.
    assert to_rgb(Image.new("RGBA", (2, 2), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(img, exif=exif.tobytes())
    assert to_rgb(open_checked(data, 10**6)).size == (20, 40)


def test_decode_for_model_shape_and_range():
    data = encode(Image.new("RGB", (720, 405), (10, 200, 30)))
    arr = decode_for_model(data, 64)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.float32
    assert abs(arr[..., 1].mean() - 200) < 3


def test_choose_thumbnail_smallest_big_enough_else_largest():
    images = [
        {"url": "a", "width": 1920, "height": 1080},
        {"url": "b", "width": 256, "height": 144},
        {"url": "c", "width": 720, "height": 405},
    ]
    assert choose_thumbnail(images, 224) == "c"
    assert choose_thumbnail(images, 100) == "b"
    assert choose_thumbnail(images, 2000) == "a"
    assert choose_thumbnail([], 224) is None
