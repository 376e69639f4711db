"""Feature extraction speed: the pipeline against the blog post's per-image loop, in one run.

Same thumbnails (rendered 720x405 JPEGs, the size the download stage picks for 224 px), same
seeded weights. Reports images/s, the ratio to the reference loop, and the useful work rate
as a fraction of this machine's float32 matmul ceiling, measured here with a large numpy matmul.

FLOPs are counted as 2 per multiply-add on both sides: VGG16's convolutional part at 224 px is
15.35 G multiply-adds (the often quoted "15.5 GFLOPs" counts multiply-adds), so 30.7 GFLOP per
image, computed from the model's own layer shapes. A Winograd engine does fewer multiplications
for the same result; its rate is still counted in direct-convolution FLOPs, i.e. useful work.

    python bench/bench_extract.py            # 224 px, 64 images (about a minute on 2 cores)
    python bench/bench_extract.py --quick    # 112 px, 24 images

On a GPU machine without TensorFlow, the Keras engine runs on JAX or PyTorch:

    KERAS_BACKEND=jax python bench/bench_extract.py --engines keras --images 2048
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT / "tools")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from fake_sketchfab.render import SHAPE_CLASSES, render_thumbnail  # noqa: E402
from sketchfab_similarity.core.backend import cpu_count  # noqa: E402
from sketchfab_similarity.core.featurespec import FeatureSpec  # noqa: E402
from sketchfab_similarity.core.settings import Settings  # noqa: E402
from sketchfab_similarity.features.engines import make_engine  # noqa: E402
from sketchfab_similarity.features.extract import FeatureExtractor, PendingImage  # noqa: E402
from sketchfab_similarity.features.reference import reference_model, reference_vectors  # noqa: E402

MATMUL_N = 4096
MATMUL_CODE = f"""
import time, numpy as np
a = np.random.default_rng(0).random(({MATMUL_N}, {MATMUL_N}), dtype=np.float32)
b = a.T.copy()
a @ b
times = []
for _ in range(3):
    t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
print(2 * {MATMUL_N}**3 / min(times) / 1e9)
"""


def matmul_ceiling() -> dict[str, float]:
    """GFLOP/s of a large float32 numpy matmul: as this process runs, and with OpenBLAS free to
    pick its best kernel (some environments pin OPENBLAS_CORETYPE to an older one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    out = {}
    for label, run_env in (("this environment", dict(os.environ)), ("OpenBLAS unpinned", env)):
        text = subprocess.run(
            [sys.executable, "-c", MATMUL_CODE], env=run_env, capture_output=True, text=True, check=True
        ).stdout
        out[label] = float(text.split()[-1])
    return out


def conv_flops(model) -> float:
    """2 x multiply-adds of every convolution, from the model's output shapes."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel = layer.get_weights()[0]
            _, height, width, _ = layer.output.shape
            total += 2 * height * width * kernel.size
    return float(total)


def render_thumbnails(directory: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = directory / f"{i:04d}.jpg"
        render_thumbnail(SHAPE_CLASSES[i % len(SHAPE_CLASSES)], 1000 + i, 720, 405).save(path, quality=90)
        paths.append(path)
    return paths


def time_pipeline(extractor: FeatureExtractor, paths: list[Path]) -> tuple[float, np.ndarray]:
    items = [PendingImage(uid=f"{i:032x}", stored_path=str(p), content_hash="") for i, p in enumerate(paths)]
    extractor.run(
        items[: extractor.engine.batch_size], lambda it: Path(it.stored_path).read_bytes()
    )  # warm-up
    start = time.perf_counter()
    done, vectors, failures = extractor.run(items, lambda it: Path(it.stored_path).read_bytes())
    elapsed = time.perf_counter() - start
    assert not failures and len(done) == len(items), failures
    return len(items) / elapsed, vectors


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--images", type=int, default=64, help="images through each pipeline engine")
    parser.add_argument("--reference-images", type=int, default=16, help="images through the per-image loop")
    parser.add_argument("--engines", default="ncnn,keras", help="comma-separated pipeline engines")
    parser.add_argument("--quick", action="store_true", help="112 px, 24 images, 8 reference images")
    args = parser.parse_args()
    if args.quick:
        args.size, args.images, args.reference_images = 112, 24, 8

    spec = FeatureSpec(weights="random", input_size=args.size)
    ceilings = matmul_ceiling()
    ceiling = max(ceilings.values())

    with tempfile.TemporaryDirectory() as tmp:
        paths = render_thumbnails(Path(tmp), max(args.images, args.reference_images))
        ref_paths = paths[: args.reference_images]

        model = reference_model(spec)
        flops = conv_flops(model)
        reference_vectors(ref_paths[:1], spec, model)  # warm-up
        start = time.perf_counter()
        reference = reference_vectors(ref_paths, spec, model)
        reference_rate = len(ref_paths) / (time.perf_counter() - start)

        rows = [("reference loop (load_img, predict per image)", reference_rate, None)]
        for engine in args.engines.split(","):
            built, device = make_engine(spec, Settings(extract_engine=engine, vgg16_weights="random"))
            rate, vectors = time_pipeline(FeatureExtractor(spec, built), paths[: args.images])
            n = len(ref_paths)
            fidelity = (
                float(np.abs(vectors[:n] - reference).max()),
                float((vectors[:n] * reference).sum(1).min()),
            )
            rows.append((f"pipeline, {engine} engine on {device}", rate, fidelity))

    print(f"\nVGG16 to {spec.layer} + {spec.pooling} pooling at {args.size} px: "
          f"{flops / 1e9:.2f} GFLOP/image ({flops / 2e9:.2f} G multiply-adds); {cpu_count()} cores")  # fmt: skip
    for label, value in ceilings.items():
        print(f"float32 matmul ceiling ({MATMUL_N}^2 numpy, {label}): {value:.0f} GFLOP/s")
    print(f"ceiling used: {ceiling:.0f} GFLOP/s\n")
    header = f"{'path':<48} {'img/s':>7} {'x ref':>6} {'GFLOP/s':>8} {'% ceiling':>9}  vs reference"
    print(header)
    print("-" * len(header))
    results = []
    for label, rate, fidelity in rows:
        gflops = rate * flops / 1e9
        check = "" if fidelity is None else f"max|d| {fidelity[0]:.1e}, min cos {fidelity[1]:.6f}"
        print(f"{label:<48} {rate:7.2f} {rate / reference_rate:6.2f} {gflops:8.0f} {100 * gflops / ceiling:8.0f}%  {check}")  # fmt: skip
        results.append({"path": label, "images_per_s": rate, "x_reference": rate / reference_rate,
                        "gflop_per_s": gflops, "fraction_of_ceiling": gflops / ceiling})  # fmt: skip
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_extract.json").write_text(
        json.dumps(
            {"size": args.size, "gflop_per_image": flops / 1e9, "ceilings": ceilings, "rows": results},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
