import io

import numpy as np
import pytest
from PIL import Image
from sketchfab_similarity.core.images import (
    INTERPOLATIONS,
    ImageRejected,
    decode_for_model,
    open_checked,
    open_reduced,
    resize_for_model,
    to_rgb,
)
from sketchfab_similarity.thumbnails.plan import choose_thumbnail


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


def photo_like(width, height):
    """Smooth noise upscaled: JPEG-friendly, with detail at every scale."""
    small = np.random.default_rng(1).integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["squash", "center_crop"])
@pytest.mark.parametrize("interpolation", sorted(INTERPOLATIONS))
def test_resize_is_pixel_for_pixel_load_img(tmp_path, mode, interpolation):
    import keras

    for size in [(720, 405), (405, 720), (333, 333)]:
        path = tmp_path / f"{size}.png"
        photo_like(*size).save(path)
        expected = keras.utils.load_img(
            path, target_size=(96, 96), interpolation=interpolation, keep_aspect_ratio=mode == "center_crop"
        )
        got = resize_for_model(Image.open(path).convert("RGB"), 96, mode, interpolation)
        assert np.array_equal(np.asarray(got), np.asarray(expected)), size


def test_reduced_decoding_keeps_three_times_the_input_size():
    big = encode(photo_like(2688, 1512))
    assert open_reduced(big, 224, 10**8).size == (1344, 756)  # 1/2: both sides still >= 3 x 224
    assert open_reduced(big, 96, 10**8).size == (672, 378)  # 1/4
    assert open_reduced(big, 512, 10**8).size == (2688, 1512)  # no room: full decode
    png = encode(photo_like(2688, 1512), "PNG")
    assert open_reduced(png, 96, 10**8).size == (2688, 1512)  # only JPEG has a reduced decoder


def test_reduced_decoding_refuses_what_full_decoding_refuses():
    big = encode(photo_like(1600, 900))
    with pytest.raises(ImageRejected, match="empty"):
        open_reduced(b"", 64, 10**8)
    with pytest.raises(ImageRejected, match="not a decodable image"):
        open_reduced(b"<html>oops</html>", 64, 10**8)
    with pytest.raises(ImageRejected, match="truncated or corrupt"):
        open_reduced(big[: len(big) // 2], 64, 10**8)
    with pytest.raises(ImageRejected, match="over the 1000 cap"):
        open_reduced(big, 64, 1000)


def test_decode_modes_and_nearest_decodes_in_full():
    data = encode(photo_like(1600, 900))
    full = decode_for_model(data, 64, interpolation="nearest", jpeg_decode="full")
    assert np.array_equal(decode_for_model(data, 64, interpolation="nearest", jpeg_decode="reduced"), full)
    reduced = decode_for_model(data, 64)
    assert not np.array_equal(reduced, decode_for_model(data, 64, jpeg_decode="full"))
    assert np.abs(reduced - decode_for_model(data, 64, jpeg_decode="full")).mean() < 2.0
    with pytest.raises(ValueError, match="jpeg_decode must be one of"):
        decode_for_model(data, 64, jpeg_decode="fast")


def test_hostile_corpus_is_accepted_or_refused_alike_by_both_paths_without_decoding_bombs():
    from hostile_images import corpus
    from sketchfab_similarity.core.images import MAX_DECODE_BYTES, decode_cost
    from sketchfab_similarity.core.settings import Settings

    settings = Settings()
    outcomes = {}
    for name, (_, data, expected) in corpus().items():
        try:
            img = to_rgb(
                open_checked(data, settings.max_image_pixels, max_bytes=settings.max_image_decode_bytes)
            )
            assert img.mode == "RGB"
            verdict = None
        except ImageRejected as exc:
            verdict = str(exc)
        for jpeg_decode in ("reduced", "full"):
            try:
                pixels = decode_for_model(data, 32, jpeg_decode=jpeg_decode)
                assert pixels.shape == (32, 32, 3), name
                again = None
            except ImageRejected as exc:
                again = str(exc)
            assert (again is None) == (verdict is None), (name, jpeg_decode, again, verdict)
        outcomes[name] = verdict
        if expected is None:
            assert verdict is None, (name, verdict)
        else:
            assert verdict is not None and verdict.startswith(expected), (name, verdict)
    assert len(outcomes) == 17
    # A tiny file may not cost more than the budget: the header decides, before any decoding.
    assert decode_cost("RGBA", 4000, 4000) > MAX_DECODE_BYTES > decode_cost("RGB", 1920, 1080) * 10
