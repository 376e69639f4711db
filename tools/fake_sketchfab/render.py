"""Deterministic 3D-looking thumbnails: sphere-traced SDF solids shaded with numpy.

Signed distance functions keep each shape class to a few lines and vectorise over
pixels, so a whole catalog renders on a CPU without a GL stack. Every random
choice (pose, colour, light, background, framing) comes from ``params_seed``, so a
thumbnail is a pure function of ``(shape, params_seed, width, height)``.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPE_CLASSES: tuple[str, ...] = (
    "cube",
    "sphere",
    "cylinder",
    "cone",
    "torus",
    "pyramid",
    "capsule",
    "octahedron",
)

# Thumbnails are rendered at most this wide, then resized with LANCZOS: the
# render cost grows with pixels, the resize and JPEG encode barely do.
BASE_WIDTH = 512
JPEG_QUALITY = 90

_FOV_Y = math.radians(32.0)
_CAMERA_Z = 6.0
_EPS = 1.5e-3
_MAX_STEPS = 72

# Named hues (degrees) so that catalog names such as "Red cube" match the picture.
_HUES: tuple[tuple[str, float], ...] = (
    ("Red", 2.0),
    ("Orange", 26.0),
    ("Yellow", 50.0),
    ("Lime", 88.0),
    ("Green", 135.0),
    ("Teal", 172.0),
    ("Blue", 218.0),
    ("Indigo", 245.0),
    ("Purple", 278.0),
    ("Pink", 325.0),
)
_GREYS: tuple[tuple[str, float], ...] = (("White", 0.92), ("Grey", 0.62))

Sdf = Callable[[np.ndarray], np.ndarray]


def _length(v: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("...i,...i->...", v, v))


def _round_box(p: np.ndarray, half: np.ndarray, r: float) -> np.ndarray:
    q = np.abs(p) - (half - r)
    outside = _length(np.maximum(q, 0.0))
    inside = np.minimum(q.max(axis=1), 0.0)
    return outside + inside - r


def _round_cylinder(p: np.ndarray, radius: float, half_h: float, r: float) -> np.ndarray:
    dx = np.hypot(p[:, 0], p[:, 2]) - (radius - r)
    dy = np.abs(p[:, 1]) - (half_h - r)
    outside = np.hypot(np.maximum(dx, 0.0), np.maximum(dy, 0.0))
    return outside + np.minimum(np.maximum(dx, dy), 0.0) - r


def _cone(p: np.ndarray, radius: float, half_h: float) -> np.ndarray:
    """Exact capped cone (apex up) after Inigo Quilez's sdCappedCone with r2 = 0."""
    qx = np.hypot(p[:, 0], p[:, 2])
    qy = p[:, 1]
    k2x, k2y = -radius, 2.0 * half_h
    cax = qx - np.minimum(qx, np.where(qy < 0.0, radius, 0.0))
    cay = np.abs(qy) - half_h
    f = np.clip(((-qx) * k2x + (half_h - qy) * k2y) / (k2x * k2x + k2y * k2y), 0.0, 1.0)
    cbx = qx + k2x * f
    cby = qy - half_h + k2y * f
    sign = np.where((cbx < 0.0) & (cay < 0.0), -1.0, 1.0)
    return sign * np.sqrt(np.minimum(cax * cax + cay * cay, cbx * cbx + cby * cby))


def _torus(p: np.ndarray, major: float, minor: float) -> np.ndarray:
    return np.hypot(np.hypot(p[:, 0], p[:, 2]) - major, p[:, 1]) - minor


def _capsule(p: np.ndarray, half_h: float, radius: float) -> np.ndarray:
    q = p.copy()
    q[:, 1] -= np.clip(q[:, 1], -half_h, half_h)
    return _length(q) - radius


def _convex(p: np.ndarray, normals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Max of plane distances: a lower bound of the true distance, exact on faces."""
    return (p @ normals.T - offsets).max(axis=1)


def _pyramid_planes(half_base: float, y0: float, apex_y: float) -> tuple[np.ndarray, np.ndarray]:
    h = apex_y - y0
    sides = [np.array([sx * h, half_base, sz * h]) for sx, sz in ((1, 0), (-1, 0), (0, 1), (0, -1))]
    normals = [s / np.linalg.norm(s) for s in sides] + [np.array([0.0, -1.0, 0.0])]
    offsets = [float(n @ np.array([0.0, apex_y, 0.0])) for n in normals[:4]] + [-y0]
    return np.array(normals, dtype=np.float32), np.array(offsets, dtype=np.float32)


_OCTA_NORMALS = np.array(
    [[sx, sy, sz] for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)], dtype=np.float32
) / np.float32(math.sqrt(3.0))


def _shape_sdf(shape: str, stretch: float) -> tuple[Sdf, float]:
    """The SDF of a shape class and the radius of a sphere that bounds it.

    ``stretch`` (about 0.85-1.15) varies proportions within a class a little
    without making it look like another class.
    """
    if shape == "cube":
        half = np.array([0.58, 0.58 * stretch, 0.58], dtype=np.float32)
        return (lambda p: _round_box(p, half, 0.03)), float(np.linalg.norm(half))
    if shape == "sphere":
        return (lambda p: _length(p) - 0.8), 0.8
    if shape == "cylinder":
        radius, half_h = 0.55, 0.62 * stretch
        return (lambda p: _round_cylinder(p, radius, half_h, 0.03)), math.hypot(radius, half_h)
    if shape == "cone":
        radius, half_h = 0.62, 0.72 * stretch
        # Shift down so the cone's centroid, not its bounding box centre, sits at the origin.
        shift = np.array([0.0, 0.5 * half_h, 0.0], dtype=np.float32)
        return (lambda p: _cone(p - shift, radius, half_h)), max(
            math.hypot(radius, 0.5 * half_h), 1.5 * half_h
        )
    if shape == "torus":
        major, minor = 0.66, 0.26 * stretch
        return (lambda p: _torus(p, major, minor)), major + minor
    if shape == "pyramid":
        half_base, y0, apex_y = 0.7, -0.42, 0.8 * stretch + 0.1
        normals, offsets = _pyramid_planes(half_base, y0, apex_y)
        return (lambda p: _convex(p, normals, offsets)), max(
            math.hypot(half_base * math.sqrt(2.0), y0), apex_y
        )
    if shape == "capsule":
        half_h, radius = 0.5 * stretch, 0.4
        return (lambda p: _capsule(p, half_h, radius)), half_h + radius
    if shape == "octahedron":
        size = 0.9 * stretch
        offsets = np.full(8, size / math.sqrt(3.0), dtype=np.float32)
        return (lambda p: _convex(p, _OCTA_NORMALS, offsets)), size
    raise ValueError(f"unknown shape class {shape!r}; expected one of {SHAPE_CLASSES}")


# Axis constraint per class, |object up . view axis|: tori read as rings only when
# seen from above; the others lose their identity when seen end-on.
_AXIS_LIMITS: dict[str, tuple[float, float]] = {
    "torus": (0.45, 0.95),
    "cube": (0.0, 0.9),
    "sphere": (0.0, 1.0),
    "octahedron": (0.0, 0.9),
}
_DEFAULT_AXIS_LIMIT = (0.0, 0.75)


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _random_rotation(shape: str, rng: np.random.Generator) -> np.ndarray:
    """An upright, seen-from-above pose mostly; a free tumble sometimes."""
    low, high = _AXIS_LIMITS.get(shape, _DEFAULT_AXIS_LIMIT)
    for _ in range(64):
        if rng.random() < 0.7:
            elevation = rng.uniform(0.9, 1.3) if shape == "torus" else rng.uniform(0.25, 0.7)
            rot = _rot_x(-elevation) @ _rot_z(rng.normal(0.0, 0.15)) @ _rot_y(rng.uniform(0, 2 * math.pi))
        else:
            q = rng.normal(size=4)
            w, x, y, z = q / np.linalg.norm(q)
            rot = np.array(
                [
                    [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                    [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                    [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
                ]
            )
        if low <= abs(rot[2, 1]) <= high:
            return rot
    return _rot_x(-0.5)


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


@dataclass(frozen=True, eq=False)
class RenderParams:
    """Everything random about one thumbnail, drawn from its seed."""

    colour_name: str
    colour: np.ndarray  # sRGB, 0..1
    rotation: np.ndarray  # object -> camera space
    stretch: float
    size_fraction: float  # bounding-sphere diameter / frame height
    offset: tuple[float, float]  # object centre, fraction of the free room left/right, up/down
    light_dir: np.ndarray  # towards the light, camera space
    ambient: float
    specular: float
    shininess: float
    bg_top: np.ndarray
    bg_bottom: np.ndarray
    floor: np.ndarray | None  # floor colour, or None for a plain backdrop
    horizon: float  # 0 (top) .. 1 (bottom) of the frame

    @staticmethod
    def colour_name_from_seed(params_seed: int) -> str:
        """The colour name `from_seed` would pick, from the same first two draws, without the rest."""
        rng = np.random.default_rng([params_seed & 0xFFFFFFFF, params_seed >> 32 & 0xFFFFFFFF, 0x5F3D])
        if rng.random() < 0.85:
            return _HUES[rng.integers(len(_HUES))][0]
        return _GREYS[rng.integers(len(_GREYS))][0]

    @classmethod
    def from_seed(cls, shape: str, params_seed: int) -> RenderParams:
        rng = np.random.default_rng([params_seed & 0xFFFFFFFF, params_seed >> 32 & 0xFFFFFFFF, 0x5F3D])
        if rng.random() < 0.85:
            name, hue = _HUES[rng.integers(len(_HUES))]
            colour = colorsys.hsv_to_rgb(
                ((hue + rng.uniform(-6, 6)) % 360) / 360, rng.uniform(0.6, 0.9), rng.uniform(0.65, 0.95)
            )
        else:
            name, value = _GREYS[rng.integers(len(_GREYS))]
            colour = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.06), value)
        obj_value = max(colour)
        # Backdrop contrasts the object: dark behind light objects, and vice versa mostly.
        dark_bg = obj_value > 0.75 if rng.random() < 0.8 else obj_value <= 0.75
        base_v = rng.uniform(0.12, 0.4) if dark_bg else rng.uniform(0.7, 0.95)
        bg_hue = rng.random()
        bg_top = colorsys.hsv_to_rgb(bg_hue, rng.uniform(0.05, 0.4), base_v)
        bg_bottom = colorsys.hsv_to_rgb(
            (bg_hue + rng.uniform(-0.15, 0.15)) % 1.0,
            rng.uniform(0.05, 0.45),
            float(np.clip(base_v + rng.uniform(-0.25, 0.1), 0.05, 1.0)),
        )
        floor = None
        if rng.random() < 0.5:
            floor = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), base_v * 0.9 + 0.05))
        light = np.array([rng.uniform(-1.0, 1.0), rng.uniform(0.35, 1.0), -rng.uniform(0.4, 1.0)])
        return cls(
            colour_name=name,
            colour=np.array(colour),
            rotation=_random_rotation(shape, rng),
            stretch=float(rng.uniform(0.88, 1.12)),
            size_fraction=float(rng.uniform(0.5, 0.85)),
            offset=(float(rng.uniform(-0.8, 0.8)), float(rng.uniform(-0.6, 0.6))),
            light_dir=light / np.linalg.norm(light),
            ambient=float(rng.uniform(0.12, 0.25)),
            specular=float(rng.uniform(0.15, 0.45)),
            shininess=float(rng.uniform(16.0, 64.0)),
            bg_top=np.array(bg_top),
            bg_bottom=np.array(bg_bottom),
            floor=floor,
            horizon=float(rng.uniform(0.55, 0.75)),
        )


@functools.lru_cache(maxsize=4)
def _camera_rays(width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit ray directions per pixel (camera at the origin looking down +z) and pixel grids."""
    tan_half = math.tan(_FOV_Y / 2)
    aspect = width / height
    xs = ((np.arange(width) + 0.5) / width * 2 - 1) * tan_half * aspect
    ys = (1 - (np.arange(height) + 0.5) / height * 2) * tan_half
    gx, gy = np.meshgrid(xs, ys)
    dirs = np.stack([gx, gy, np.ones_like(gx)], axis=-1).reshape(-1, 3)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    rows = np.repeat((np.arange(height) + 0.5) / height, width)
    cols = np.tile((np.arange(width) + 0.5) / width, height)
    return dirs.astype(np.float32), rows, cols


def _trace(sdf: Sdf, origin: np.ndarray, dirs: np.ndarray, t0: np.ndarray, t1: np.ndarray) -> np.ndarray:
    """Sphere-trace rays that enter the bounding sphere; returns hit distances (NaN = miss).

    Rays are compacted every step so that the work shrinks as rays hit or leave.
    """
    t = t0.copy()
    result = np.full(len(dirs), np.nan, dtype=np.float32)
    active = np.arange(len(dirs))
    dist = np.zeros(0, dtype=np.float32)
    for _ in range(_MAX_STEPS):
        if active.size == 0:
            break
        dist = sdf(origin + t[active, None] * dirs[active]).astype(np.float32)
        hit = dist < _EPS
        result[active[hit]] = t[active[hit]]
        t[active] += dist
        keep = ~hit & (t[active] < t1[active])
        active, dist = active[keep], dist[keep]
    close = dist < 8 * _EPS  # grazing rays out of steps: accept the ones that got close
    result[active[close]] = t[active[close]]
    return result


_TETRA = np.array([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=np.float32)


def _normals(sdf: Sdf, p: np.ndarray) -> np.ndarray:
    h = np.float32(1e-3)
    n = sum(k * sdf(p + h * k)[:, None] for k in _TETRA)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)


@functools.lru_cache(maxsize=64)
def _render_base(shape: str, params_seed: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 (h, w, 3) and object mask (h, w); cached so each size of a model reuses it."""
    prm = RenderParams.from_seed(shape, params_seed)
    sdf, bound = _shape_sdf(shape, prm.stretch)
    dirs, rows, cols = _camera_rays(width, height)
    tan_half = math.tan(_FOV_Y / 2)
    aspect = width / height

    # Framing: scale so the bounding sphere spans size_fraction of the frame height,
    # then move the centre within the room that leaves.
    frac = prm.size_fraction
    scale = frac * _CAMERA_Z * tan_half / bound
    room_x = max(aspect - frac, 0.0) * _CAMERA_Z * tan_half
    room_y = max(1.0 - frac, 0.0) * _CAMERA_Z * tan_half
    centre = np.array([prm.offset[0] * room_x, prm.offset[1] * room_y, _CAMERA_Z])

    # Trace in object space: rotate and scale the rays instead of the shape.
    rot = prm.rotation
    origin = (rot.T @ (-centre) / scale).astype(np.float32)
    obj_dirs = dirs @ rot.astype(np.float32)  # rows are R^T d
    b = obj_dirs @ origin
    disc = b * b - (origin @ origin - np.float32(bound * bound * 1.02))
    enters = np.flatnonzero(disc > 0)
    root = np.sqrt(disc[enters])
    t_hit = _trace(sdf, origin, obj_dirs[enters], np.maximum(-b[enters] - root, 0.0), -b[enters] + root)
    hit_idx = enters[~np.isnan(t_hit)]
    t_hit = t_hit[~np.isnan(t_hit)]

    # Background: vertical gradient, optionally a floor with a soft contact shadow.
    bg = prm.bg_top[None, :] * (1 - rows[:, None]) + prm.bg_bottom[None, :] * rows[:, None]
    if prm.floor is not None:
        below = np.clip((rows - prm.horizon) / (1 - prm.horizon), 0.0, 1.0)[:, None]
        floor = prm.floor[None, :] * (0.75 + 0.35 * below)
        bg = np.where(below > 0, floor, bg)
        if hit_idx.size:  # a contact shadow just under the object's lowest pixel
            hit_cols = cols[hit_idx]
            half_w = max((hit_cols.max() - hit_cols.min()) * aspect / 2, 1e-3)
            dx = (cols - hit_cols.mean()) * aspect / (half_w * 1.1)
            dy = (rows - rows[hit_idx].max()) / (half_w * 0.22)
            bg = bg * (1 - 0.55 * np.exp(-dx * dx - dy * dy))[:, None]
    img = _srgb_to_linear(bg)

    # Shading (linear light): hemispheric ambient + Lambert + Blinn-Phong specular + a little rim.
    p_obj = origin + t_hit[:, None] * obj_dirs[hit_idx]
    n = _normals(sdf, p_obj) @ rot.T.astype(np.float32)
    view = -dirs[hit_idx]
    light = prm.light_dir
    albedo = _srgb_to_linear(prm.colour)
    diffuse = np.clip(n @ light, 0.0, None)
    sky = 0.5 + 0.5 * n[:, 1]
    half = light - dirs[hit_idx]
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    spec = prm.specular * np.clip(np.einsum("ij,ij->i", n, half), 0.0, None) ** prm.shininess
    rim = 0.08 * (1 - np.clip(np.einsum("ij,ij->i", n, view), 0.0, 1.0)) ** 3
    lum = prm.ambient * (0.6 + 0.6 * sky) + 0.95 * diffuse
    img[hit_idx] = albedo[None, :] * lum[:, None] + (spec + rim)[:, None]

    rgb = (_linear_to_srgb(img) * 255 + 0.5).astype(np.uint8).reshape(height, width, 3)
    mask = np.zeros(width * height, dtype=bool)
    mask[hit_idx] = True
    mask = mask.reshape(height, width)
    rgb.flags.writeable = mask.flags.writeable = False  # shared through the cache
    return rgb, mask


def _base_size(width: int, height: int) -> tuple[int, int]:
    """Render at twice the target (anti-aliasing for small thumbnails), capped at BASE_WIDTH."""
    base_w = min(2 * width, BASE_WIDTH)
    return base_w, max(1, round(base_w * height / width))


def render_thumbnail(shape: str, params_seed: int, width: int, height: int) -> Image.Image:
    """A shaded solid of ``shape`` in a pose, colour and light drawn from ``params_seed``."""
    rgb, _ = _render_base(shape, params_seed, *_base_size(width, height))
    image = Image.fromarray(rgb, "RGB")
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def object_mask(shape: str, params_seed: int, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of object pixels, so tests can check framing and shape."""
    _, mask = _render_base(shape, params_seed, *_base_size(width, height))
    image = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image) >= 128


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
