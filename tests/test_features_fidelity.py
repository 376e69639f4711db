"""The fast pipeline against the blog post's per-image reference, on real photographs and odd modes.

Real TensorFlow and real ncnn, seeded random weights (the zero-mean random filters tell these
photographs apart: pairwise cosines stay well under the 0.99 bar, which the first test checks,
so a wrong image, crop or orientation cannot pass).

For palette-with-alpha and EXIF-rotated files the pipeline deliberately differs from
keras.utils.load_img, which drops transparency to whatever colour the palette holds and ignores
EXIF orientation. There the reference reads the picture as a viewer sees it (flattened onto
white, upright) and the pipeline reads the odd file.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
from fake_sketchfab.render import render_thumbnail
from PIL import Image
from sketchfab_similarity.core.featurespec import FeatureSpec
from sketchfab_similarity.core.settings import Settings
from sketchfab_similarity.features import reference as blog_post
from sketchfab_similarity.features.engines import make_engine
from sketchfab_similarity.features.extract import FeatureExtractor
from sketchfab_similarity.features.reference import reference_vectors

pytestmark = pytest.mark.integration

PHOTOS = Path(__file__).parent / "data" / "photos"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (file the pipeline reads, file the reference reads)."""
    out = tmp_path_factory.mktemp("fidelity")
    pairs: dict[str, tuple[Path, Path]] = {}
    for photo in sorted(PHOTOS.glob("*.jpg")):
        pairs[photo.stem] = (photo, photo)  # camera.jpg is a greyscale (L) JPEG
    render = out / "render_1024x576.jpg"
    render_thumbnail("torus", 7, 1024, 576).save(render, quality=90)
    pairs["render_16x9"] = (render, render)

    # Big enough for reduced decoding at every tested size (1/2 scale at 224 px), full of real detail.
    mosaic = Image.new("RGB", (2688, 1512))
    tiles = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*.jpg"))]
    for i in range(24):
        tile = tiles[i % len(tiles)]
        left, top = (i * 37) % (tile.width - 447), (i * 53) % (tile.height - 377)
        mosaic.paste(tile.crop((left, top, left + 448, top + 378)), ((i % 6) * 448, (i // 6) * 378))
    mosaic_file = out / "mosaic_2688x1512.jpg"
    mosaic.save(mosaic_file, quality=90)
    pairs["mosaic_16x9"] = (mosaic_file, mosaic_file)

    cmyk = out / "astronaut_cmyk.jpg"
    Image.open(PHOTOS / "astronaut.jpg").convert("CMYK").save(cmyk, quality=92)
    pairs["cmyk"] = (cmyk, cmyk)

    chelsea = Image.open(PHOTOS / "chelsea.jpg")
    palette = chelsea.quantize(255)
    pixels = np.array(palette)
    pixels[:, :60] = 255  # a transparent band on the left, index 255 is black in the palette
    palette = Image.fromarray(pixels, "P")
    palette.putpalette(chelsea.quantize(255).getpalette()[: 255 * 3] + [0, 0, 0])
    palette_file = out / "chelsea_palette_alpha.png"
    palette.save(palette_file, transparency=255)
    flattened = out / "chelsea_palette_flattened.png"
    rgba = Image.open(palette_file).convert("RGBA")
    Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB").save(
        flattened
    )
    pairs["palette_alpha"] = (palette_file, flattened)

    coffee = Image.open(PHOTOS / "coffee.jpg")
    rotated = out / "coffee_exif_rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees anticlockwise; viewers turn it clockwise
    coffee.transpose(Image.Transpose.ROTATE_90).save(rotated, quality=95, exif=exif.tobytes())
    upright = out / "coffee_upright.png"
    # The upright reference must carry exactly the pixels the rotated file decodes to.
    Image.open(rotated).transpose(Image.Transpose.ROTATE_270).save(upright)
    pairs["exif_rotated"] = (rotated, upright)
    return pairs


@cache
def reference_model(spec: FeatureSpec):
    return blog_post.reference_model(spec)


@cache
def extractor(spec: FeatureSpec, engine: str) -> FeatureExtractor:
    built, _ = make_engine(spec, Settings(extract_engine=engine, extract_batch_size=8))
    return FeatureExtractor(spec, built)


def fast_vectors(spec: FeatureSpec, engine: str, paths: list[Path]) -> np.ndarray:
    ex = extractor(spec, engine)
    return ex.embed(np.stack([ex.prepare(p.read_bytes()) for p in paths]))


def reference(spec: FeatureSpec, paths: list[Path]) -> np.ndarray:
    full = FeatureSpec(**{**spec.__dict__, "jpeg_decode": "full"})
    return reference_vectors(paths, full, reference_model(full))


def test_random_weights_tell_these_photographs_apart():
    spec = FeatureSpec(weights="random", input_size=112, jpeg_decode="full")
    ref = reference(spec, sorted(PHOTOS.glob("*.jpg")))
    cosines = ref @ ref.T
    off_diagonal = cosines[~np.eye(len(ref), dtype=bool)]
    assert off_diagonal.max() < 0.98, "the 0.99 fidelity bar would not tell these pictures apart"


@pytest.mark.parametrize("engine", ["ncnn", "keras"])
@pytest.mark.parametrize(
    ("size", "resize", "interpolation"),
    [(112, "squash", "nearest"), (112, "squash", "bilinear"), (64, "center_crop", "bicubic")],
)
def test_same_resize_settings_match_the_reference_within_1e4(images, engine, size, resize, interpolation):
    spec = FeatureSpec(
        weights="random", input_size=size, resize=resize, interpolation=interpolation, jpeg_decode="full"
    )
    names = sorted(images)
    fast = fast_vectors(spec, engine, [images[n][0] for n in names])
    ref = reference(spec, [images[n][1] for n in names])
    errors = dict(zip(names, np.abs(fast - ref).max(axis=1).round(7), strict=True))
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize("size", [64, 224])
def test_reduced_jpeg_decoding_stays_within_cosine_099(images, size):
    spec = FeatureSpec(weights="random", input_size=size)  # the defaults: bilinear, reduced decoding
    assert spec.jpeg_decode == "reduced"
    names = sorted(images)
    fast = fast_vectors(spec, "ncnn", [images[n][0] for n in names])
    ref = reference(spec, [images[n][1] for n in names])
    # The pipeline's vectors are unit length (model_embeddings' contract); the cosine divides by
    # both norms, so it measures direction only and cannot pass on a vector's length.
    assert np.abs(np.linalg.norm(fast, axis=1) - 1).max() < 1e-5, "fast vectors are not L2-normalised"
    norms = np.linalg.norm(fast, axis=1) * np.linalg.norm(ref, axis=1)
    cosines = dict(zip(names, ((fast * ref).sum(axis=1) / norms).round(5), strict=True))
    assert min(cosines.values()) >= 0.99, cosines


@pytest.mark.parametrize(("layer", "pooling"), [("block4_pool", "max"), ("block5_conv3", "avg")])
def test_other_layers_and_pooling_match_the_reference(images, layer, pooling):
    spec = FeatureSpec(weights="random", input_size=96, layer=layer, pooling=pooling, jpeg_decode="full")
    paths = [images[n][0] for n in ("astronaut", "rocket", "render_16x9")]
    ref = reference(spec, paths)
    for engine in ("ncnn", "keras"):
        assert np.abs(fast_vectors(spec, engine, paths) - ref).max() <= 1e-4, engine


def test_input_sizes_that_pooling_floors(images):
    """VGG16's max pooling floors odd sizes (50 -> 25 -> 12 -> 6 -> 3 -> 1); ncnn must too."""
    spec = FeatureSpec(weights="random", input_size=50, jpeg_decode="full")
    paths = [images[n][0] for n in ("chelsea", "coffee")]
    ref = reference(spec, paths)
    assert np.abs(fast_vectors(spec, "ncnn", paths) - ref).max() <= 1e-4
