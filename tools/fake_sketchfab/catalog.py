"""A deterministic synthetic Sketchfab catalog, with the faults a real crawl meets.

Every model is a pure function of ``(seed, index)``: the same seed gives the same
uids, JSON and thumbnail pixels, so tests can state exact expectations. Each model
knows its ``shape_class`` (what its thumbnail shows) and its injected fault, which
the API never reveals except through tags and categories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from .render import SHAPE_CLASSES, RenderParams

__all__ = [
    "SHAPE_CLASSES",
    "THUMBNAIL_SIZES",
    "BadRecord",
    "Catalog",
    "FaultConfig",
    "Model",
    "Thumbnail",
    "ThumbnailFault",
    "User",
]

THUMBNAIL_SIZES: tuple[tuple[int, int], ...] = ((1920, 1080), (1024, 576), (720, 405), (256, 144))
DEFAULT_BASE = datetime(2026, 11, 27, 12, 0, 0)
DEFAULT_SPACING = timedelta(minutes=7)
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"

SQL_NAME = "Robert'); DROP TABLE sketchfab_models;--"
# Emoji with a ZWJ sequence, Arabic (RTL) text, a right-to-left override, a combining mark.
UNICODE_NAME = "Fusée 🚀👩\u200d🚀 مصباح قديم \u202etxet desrever\u202c n\u0303 ✨"


class ThumbnailFault(StrEnum):
    """Ways a model's thumbnail goes wrong; a downloader must reject every one of them."""

    NO_THUMBNAILS = "no_thumbnails"  # the API lists no images at all
    TRUNCATED_JPEG = "truncated_jpeg"  # 200 image/jpeg, first half of the bytes
    HTML_200 = "html_200"  # 200 text/html error page
    ZERO_BYTES = "zero_bytes"  # 200 image/jpeg, empty body
    HUGE_DIMENSIONS = "huge_dimensions"  # tiny JPEG whose header says 40000x22500 (decompression bomb)
    NOT_FOUND = "not_found"  # 404
    REDIRECT_OFFSITE = "redirect_offsite"  # 302 to a host outside any allow-list
    WRONG_CONTENT_TYPE = "wrong_content_type"  # 200 text/plain, not an image


@dataclass(frozen=True)
class FaultConfig:
    """Fault switches, all off by default.

    The server reads the per-request fields at request time (``set_faults`` swaps
    them live); ``Catalog.generate`` reads the catalog fields once.
    """

    # Server, per request.
    latency_ms: float = 0.0  # sleep before answering any request
    rate_limit_every: int = 0  # every Nth API request starts a burst of 429s
    rate_limit_burst: int = 3  # length of each burst
    retry_after_s: int = 1  # Retry-After of burst 429s
    rate_limit_per_minute: int = 0  # enforce a real fixed-window limit (429 until the window resets)
    rate_limit_window_s: float = 60.0  # length of that window (shorter in tests)
    server_error_rate: float = 0.0  # fraction of API requests answered 500/502/503, evenly spaced
    list_outage_after: int = 0  # after N listing requests, every further one gets 503 (an outage)
    html_200_every: int = 0  # every Nth listing request gets a 200 text/html proxy page
    shift_on_page: int = 0  # after serving listing page K (1-based) the first time, publish...
    shift_publish: int = 5  # ...this many new models, so later offset pages overlap
    offsite_next_on_page: int = 0  # page K's `next` URL points at another host
    disappearing_uids: frozenset[str] = frozenset()  # listed, but 404 on detail
    refused_filters: frozenset[str] = frozenset()  # /v3/models answers 400 to these (e.g. min_face_count)
    media_error_rate: float = 0.0  # fraction of thumbnail requests answered 503/500, evenly spaced
    thumbnail_redirect: str = ""  # 302 every thumbnail request without `redirected` in its query to
    # this Location, formatted with {port} and {path} (e.g. "http://127.0.0.2:{port}{path}")
    thumbnail_bodies: Mapping[str, tuple[str, bytes]] = field(default_factory=dict)  # uid -> (type, body)
    # Catalog, at generation.
    broken_thumbnails: bool = False  # give a fraction of models a ThumbnailFault, every kind used
    broken_thumbnail_fraction: float = 0.2
    thumbnail_faults: Mapping[str, ThumbnailFault] = field(default_factory=dict)  # explicit uid -> fault
    disappearing_models: int = 0  # this many models are listed but 404 on detail
    bad_records: bool = False  # inject the records of Catalog.bad_records into listings

    @classmethod
    def parse(cls, spec: str) -> FaultConfig:
        """Parse ``"rate_limit_every=10,broken_thumbnails,latency_ms=20"`` (CLI and env vars).

        A bare name sets a flag; ``disappearing_uids`` takes uids joined by ``+``.
        """
        values: dict[str, Any] = {}
        known = {f.name: f for f in dataclasses.fields(cls)}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, has_value, raw = item.partition("=")
            name = name.strip()
            if name not in known or name in ("thumbnail_faults", "thumbnail_bodies"):
                raise ValueError(f"unknown or non-CLI fault {name!r}; known: {sorted(known)}")
            default = cls.__dataclass_fields__[name].default
            if isinstance(default, bool):
                values[name] = not has_value or raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(default, frozenset):
                values[name] = frozenset(filter(None, raw.split("+")))
            else:
                values[name] = type(default)(raw)
        return cls(**values)


@dataclass(frozen=True)
class User:
    uid: str
    username: str
    display_name: str


@dataclass(frozen=True)
class Thumbnail:
    uid: str
    width: int
    height: int
    size: int  # approximate JPEG bytes, as listed by the API


@dataclass(eq=False)
class Model:
    """One catalog entry; ``shape_class`` and the fault fields are ground truth for tests."""

    uid: str
    shape_class: str
    name: str
    description: str
    published_at: datetime
    created_at: datetime
    like_count: int
    view_count: int
    comment_count: int
    is_downloadable: bool
    staffpicked_at: datetime | None
    animation_count: int
    face_count: int
    vertex_count: int
    user: User
    tags: tuple[str, ...]
    categories: tuple[tuple[str, str], ...]  # (name, slug)
    license: tuple[str, str]  # (slug, label)
    thumbnails: tuple[Thumbnail, ...]  # in API order (shuffled)
    params_seed: int  # render seed: pose, colour, light, background
    thumbnail_fault: ThumbnailFault | None = None
    disappears: bool = False  # listed, but 404 on detail
    thumbnail_revision: int = 0  # bumped when the author replaces the thumbnail (new URLs, new picture)
    json_overrides: dict[str, Any] = field(default_factory=dict)  # bad records only
    json_drop: tuple[str, ...] = ()  # bad records only

    @property
    def slug(self) -> str:
        out = "".join(ch if ch.isascii() and ch.isalnum() else "-" for ch in self.name.lower()[:80])
        return "-".join(filter(None, out.split("-")))


@dataclass(frozen=True)
class BadRecord:
    """A nasty listing record and the verdict a crawler should reach.

    ``valid`` records (SQL-looking or exotic Unicode names) must be stored
    verbatim; invalid ones must go to the rejects table.
    """

    kind: str
    valid: bool
    reason: str
    model: Model


_COLOURLESS_NAMES = (
    "Ancient relic",
    "Café prop ☕",
    "Низкополигональная модель",
    "古い灯籠",
    "Ünïcode bust",
    'Sci-fi crate «Mk II» 12" edition',
    "مصباح قديم",
    "Tree 🌳 stump",
    "Ça va? — test scan",
    "O'Brien's lamp",
)
_DESCRIPTIONS = (
    "",
    "Made in Blender, textured in Substance.",
    "Photogrammetry scan, 120 photos.",
    "Free to use, credit appreciated! ❤",
    "Part of my daily 3D challenge.",
    "Low-poly asset for a mobile game.\nFeedback welcome.",
)
_GENERIC_TAGS = ("lowpoly", "blender", "3d", "gameready", "pbr", "stylized", "props", "geometry", "free")
_EXTRA_CATEGORIES = (
    ("Art & Abstract", "art-abstract"),
    ("Science & Technology", "science-technology"),
    ("Furniture & Home", "furniture-home"),
)
# Categories beyond the shape's own: long-tailed, a few large and many small (18 in all with the shapes').
_MORE_CATEGORIES = (
    ("Art & Abstract", "art-abstract"),
    ("Characters & Creatures", "characters-creatures"),
    ("Architecture", "architecture"),
    ("Science & Technology", "science-technology"),
    ("Furniture & Home", "furniture-home"),
    ("Cars & Vehicles", "cars-vehicles"),
    ("Weapons & Military", "weapons-military"),
    ("Nature & Plants", "nature-plants"),
    ("Food & Drink", "food-drink"),
    ("Music", "music"),
)
_MORE_CATEGORY_WEIGHTS = (30, 22, 15, 10, 8, 6, 4, 3, 1.5, 0.5)
UNCATEGORISED_SHARE = 0.12

# Every license slug the API documents, weighted like a real catalogue: mostly `by` and Standard.
_LICENSES = (
    ("by", "CC Attribution"),
    ("st", "Standard"),
    ("by-nc", "CC Attribution-NonCommercial"),
    ("by-sa", "CC Attribution-ShareAlike"),
    ("by-nc-sa", "CC Attribution-NonCommercial-ShareAlike"),
    ("by-nd", "CC Attribution-NoDerivs"),
    ("by-nc-nd", "CC Attribution-NonCommercial-NoDerivs"),
    ("cc0", "CC0 Public Domain"),
    ("ed", "Editorial"),
)
_LICENSE_WEIGHTS = (45, 25, 10, 5, 5, 3, 3, 3, 1)
MAX_FACES = 50_000_000
_BASE_FACES = {
    "cube": 12,
    "sphere": 960,
    "cylinder": 128,
    "cone": 64,
    "torus": 1152,
    "pyramid": 6,
    "capsule": 896,
    "octahedron": 8,
}
_USER_NAMES = ("Ana", "Bjørn", "Chloé", "Dmitri", "Émile", "Fatima", "Göran", "Hiro", "Inès", "José")


def _hex_id(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, ("fake-sketchfab", *parts))).encode()).hexdigest()[:32]


def _fmt(ts: datetime) -> str:
    return ts.strftime(TIMESTAMP_FORMAT)


@dataclass(eq=False)
class Catalog:
    """Models newest first, plus the bad records and bookkeeping the server needs.

    ``models`` holds the live models; ``by_uid`` also keeps removed ones so tests
    can still look up the shape class of something that disappeared.
    Not thread-safe by itself: the server serialises access.
    """

    seed: int
    base: datetime
    spacing: timedelta
    faults: FaultConfig
    models: list[Model]
    by_uid: dict[str, Model]
    bad_records: list[BadRecord]
    removed_uids: set[str] = field(default_factory=set)
    version: int = 0  # bumped on every change, so listings can cache sort orders
    _published: int = 0

    @classmethod
    def generate(
        cls,
        n_models: int,
        seed: int = 0,
        faults: FaultConfig | None = None,
        *,
        base: datetime = DEFAULT_BASE,
        spacing: timedelta = DEFAULT_SPACING,
    ) -> Catalog:
        """``n_models`` models published backwards from ``base``, about one per ``spacing``."""
        faults = faults or FaultConfig()
        users = [_make_user(seed, k) for k in range(max(3, n_models // 8))]
        models = []
        for i in range(n_models):
            published = base - spacing * (i + 0.8 * random.Random(f"{seed}:t:{i}").random())
            models.append(_make_model(seed, "m", i, published, users))
        catalog = cls(seed, base, spacing, faults, models, {m.uid: m for m in models}, [])
        catalog._apply_faults(users)
        return catalog

    def _apply_faults(self, users: list[User]) -> None:
        rng = random.Random(f"{self.seed}:faults")
        n = len(self.models)
        if self.faults.broken_thumbnails and n:
            count = max(len(ThumbnailFault), math.ceil(self.faults.broken_thumbnail_fraction * n))
            kinds = list(ThumbnailFault)
            for k, model in enumerate(rng.sample(self.models, min(count, n))):
                model.thumbnail_fault = kinds[k % len(kinds)]
        for uid, fault in self.faults.thumbnail_faults.items():
            self.by_uid[uid].thumbnail_fault = ThumbnailFault(fault)
        for model in rng.sample(self.models, min(self.faults.disappearing_models, n)):
            model.disappears = True
        if self.faults.bad_records:
            self.bad_records = self._make_bad_records(users)

    def _make_bad_records(self, users: list[User]) -> list[BadRecord]:
        n = len(self.models)
        if n < 3:
            raise ValueError("bad_records needs a catalog of at least 3 models")
        records = []
        for kind, name in (("sql_name", SQL_NAME), ("unicode_name", UNICODE_NAME)):
            model = self.models[(len(records) + 1) * n // 3]
            model.name = name
            records.append(BadRecord(kind, True, "nasty but valid: store the name verbatim", model))
        invalid = (
            ("bad_uid", "uid is not 32 lowercase hex"),
            ("uppercase_uid", "uid is not 32 lowercase hex"),
            ("missing_uid", "no uid"),
            ("bad_published_at", "publishedAt is not ISO 8601"),
            ("huge_name", "name of 100000 characters"),
        )
        for k, (kind, reason) in enumerate(invalid):
            neighbour = self.models[(k + 1) * n // (len(invalid) + 1)]
            model = _make_model(self.seed, "bad", k, neighbour.published_at - self.spacing / 100, users)
            if kind == "bad_uid":
                model.uid = "zz" + model.uid[2:30] + "!?"
            elif kind == "uppercase_uid":
                model.uid = model.uid.upper()
            elif kind == "missing_uid":
                model.json_drop = ("uid",)
            elif kind == "bad_published_at":
                model.json_overrides = {"publishedAt": model.published_at.strftime("%d/%m/%Y %H:%M")}
            else:
                model.name = "A" * 100_000
            records.append(BadRecord(kind, False, reason, model))
        return records

    @property
    def disappearing_uids(self) -> set[str]:
        return {m.uid for m in self.models if m.disappears}

    def listing(self) -> list[Model]:
        """What listings serve: live models plus invalid bad records, newest first."""
        invalid = [r.model for r in self.bad_records if not r.valid]
        return sorted(self.models + invalid, key=lambda m: (m.published_at, m.uid), reverse=True)

    def publish(self, n: int) -> list[Model]:
        """Add ``n`` models published after every existing one (newest first in the result)."""
        users = [_make_user(self.seed, k) for k in range(max(3, len(self.by_uid) // 8))]
        newest = max((m.published_at for m in self.by_uid.values()), default=self.base)
        new = []
        for _ in range(n):
            rng = random.Random(f"{self.seed}:pub-t:{self._published}")
            newest += self.spacing * (0.2 + 0.8 * rng.random())
            new.append(_make_model(self.seed, "pub", self._published, newest, users))
            self._published += 1
        new.reverse()
        self.models[:0] = new
        self.by_uid.update((m.uid, m) for m in new)
        self.version += 1
        return new

    def remove(self, uid: str) -> None:
        """Make a model vanish from listings and detail (deleted or made private)."""
        model = self.by_uid[uid]
        if uid not in self.removed_uids:
            self.models.remove(model)
            self.removed_uids.add(uid)
            self.version += 1

    def change_thumbnail(self, uid: str) -> None:
        """The author replaced the thumbnail: new image uids and URLs, a different picture of the same shape."""
        model = self.by_uid[uid]
        model.thumbnail_revision += 1
        model.params_seed = int(_hex_id(model.params_seed, "revision", model.thumbnail_revision)[:16], 16)
        model.thumbnails = tuple(
            Thumbnail(_hex_id(uid, t.width, t.height, model.thumbnail_revision), t.width, t.height, t.size)
            for t in model.thumbnails
        )
        self.version += 1

    def is_live(self, uid: str) -> bool:
        return uid in self.by_uid and uid not in self.removed_uids

    @staticmethod
    def model_json(model: Model, api_base: str, media_base: str) -> dict[str, Any]:
        """The API object, as ``GET /v3/models/{uid}`` and listings return it."""
        viewer_slug = f"{model.slug}-{model.uid}" if model.slug else model.uid
        images = [
            {
                "uid": t.uid,
                "width": t.width,
                "height": t.height,
                "size": t.size,
                "url": f"{media_base}/media/models/{model.uid}/thumbnails/{t.width}x{t.height}.jpeg"
                + (f"?v={model.thumbnail_revision}" if model.thumbnail_revision else ""),
            }
            for t in model.thumbnails
            if model.thumbnail_fault is not ThumbnailFault.NO_THUMBNAILS
        ]
        data: dict[str, Any] = {
            "uid": model.uid,
            "name": model.name,
            "description": model.description,
            "uri": f"{api_base}/v3/models/{model.uid}",
            "viewerUrl": f"https://sketchfab.com/3d-models/{viewer_slug}",
            "publishedAt": _fmt(model.published_at),
            "createdAt": _fmt(model.created_at),
            "likeCount": model.like_count,
            "viewCount": model.view_count,
            "commentCount": model.comment_count,
            "isDownloadable": model.is_downloadable,
            "isAgeRestricted": False,
            "faceCount": model.face_count,
            "vertexCount": model.vertex_count,
            "animationCount": model.animation_count,
            "staffpickedAt": _fmt(model.staffpicked_at) if model.staffpicked_at else None,
            "user": {
                "uid": model.user.uid,
                "username": model.user.username,
                "displayName": model.user.display_name,
            },
            "tags": [{"name": t, "slug": t} for t in model.tags],
            "categories": [{"name": name, "slug": slug} for name, slug in model.categories],
            "license": {"slug": model.license[0], "label": model.license[1]},
            "thumbnails": {"images": images},
        }
        data.update(model.json_overrides)
        for key in model.json_drop:
            data.pop(key, None)
        return data


def _make_user(seed: int, k: int) -> User:
    rng = random.Random(f"{seed}:user:{k}")
    first = rng.choice(_USER_NAMES)
    return User(_hex_id(seed, "user", k), f"{first.lower()}_{k}", f"{first} {rng.choice('ABCDEFGHKLMNPRS')}.")


def _license(rng: random.Random, facet_rng: random.Random) -> tuple[str, str]:
    rng.randrange(5)  # the draw the license once took from the main stream
    return facet_rng.choices(_LICENSES, _LICENSE_WEIGHTS)[0]


def _make_model(seed: int, namespace: str, index: int, published: datetime, users: list[User]) -> Model:
    """Model ``index`` of ``namespace``: its shape class comes from a per-block shuffle of all classes."""
    block = random.Random(f"{seed}:{namespace}:block:{index // len(SHAPE_CLASSES)}")
    order = list(SHAPE_CLASSES)
    block.shuffle(order)
    shape = order[index % len(SHAPE_CLASSES)]
    uid = _hex_id(seed, namespace, index)
    rng = random.Random(f"{seed}:{namespace}:{index}")
    params_seed = int(hashlib.sha256(uid.encode()).hexdigest()[:16], 16)
    colour = RenderParams.colour_name_from_seed(params_seed)
    if rng.random() < 0.75:
        name = f"{colour} {shape} #{rng.randint(1, 9999)}"
    else:
        name = rng.choice(_COLOURLESS_NAMES)
    likes = int(rng.paretovariate(1.3)) - 1
    # Face counts and licenses come from a stream of their own, so the other fields stay what they were.
    # Long-tailed, as on Sketchfab: a median of a few thousand faces, a tail into the millions.
    facet_rng = random.Random(f"{seed}:{namespace}:{index}:facets")
    rng.randrange(3)  # the draw the face-count multiplier once took, so later draws are unchanged
    faces = min(MAX_FACES, _BASE_FACES[shape] + int(math.exp(facet_rng.gauss(8.0, 2.0))))
    sizes = list(THUMBNAIL_SIZES)
    rng.shuffle(sizes)
    thumbnails = tuple(
        Thumbnail(_hex_id(uid, w, h), w, h, int(w * h * rng.uniform(0.035, 0.06))) for w, h in sizes
    )
    categories = [(shape.title(), shape)]
    if rng.random() < 0.5:
        rng.choice(_EXTRA_CATEGORIES)  # the draw the extra category once took from the main stream
        categories.append(facet_rng.choices(_MORE_CATEGORIES, _MORE_CATEGORY_WEIGHTS)[0])
    if facet_rng.random() < UNCATEGORISED_SHARE:
        categories = []  # as on Sketchfab, many models are in no category at all
    return Model(
        uid=uid,
        shape_class=shape,
        name=name,
        description=rng.choice(_DESCRIPTIONS),
        published_at=published,
        created_at=published - timedelta(minutes=rng.uniform(2, 4 * 24 * 60)),
        like_count=likes,
        view_count=likes * rng.randint(5, 40) + rng.randint(0, 200),
        comment_count=rng.randint(0, max(1, likes // 5)),
        is_downloadable=rng.random() < 0.4,
        staffpicked_at=published + timedelta(hours=rng.uniform(4, 96)) if rng.random() < 0.1 else None,
        animation_count=1 if rng.random() < 0.05 else 0,
        face_count=faces,
        vertex_count=faces // 2 + 2,
        user=rng.choice(users),
        tags=(shape, *rng.sample(_GENERIC_TAGS, 2), colour.lower()),
        categories=tuple(categories),
        license=_license(rng, facet_rng),
        thumbnails=thumbnails,
        params_seed=params_seed,
    )
