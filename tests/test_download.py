"""download_thumbnails against the local server's media host and the embedded Postgres, fault by fault."""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import uuid
from collections import Counter
from collections.abc import Iterator

import fsspec
import numpy as np
import pytest
from fake_sketchfab import Catalog, FaultConfig, Thumbnail, ThumbnailFault, start_server
from helpers import add_catalogue, execute, query
from PIL import Image
from sketchfab_similarity import crawl, thumbnails
from sketchfab_similarity.core.db import connect
from sketchfab_similarity.core.images import open_checked, to_rgb
from sketchfab_similarity.core.sharding import WHOLE, Shard
from sketchfab_similarity.core.store import ArtifactStore
from sketchfab_similarity.crawl.state import CrawlWindow
from sketchfab_similarity.thumbnails import fetch
from sketchfab_similarity.thumbnails.plan import plan_downloads, plan_query, settle

pytestmark = pytest.mark.integration

FAST = dict(api_backoff_s=0.01, download_backoff_s=0.01, download_retry_after_cap_s=0.05)


@pytest.fixture
def world(make_settings) -> Iterator:
    """Start a server over a catalog, crawl it into a fresh database, hand back (server, settings)."""
    with contextlib.ExitStack() as stack:

        def make(
            catalog: Catalog, faults: FaultConfig | None = None, media_host: str = "localhost", **overrides
        ):
            server = stack.enter_context(start_server(catalog, faults=faults, media_host=media_host))
            values = {
                "api_base_url": server.api_base_url,
                "thumbnail_hosts": (media_host,),
                **FAST,
                **overrides,
            }
            settings = make_settings(**values)
            crawl.crawl(settings, CrawlWindow())
            return server, settings

        yield make


def rows(db_url: str) -> dict[str, tuple]:
    result = query(
        db_url,
        "SELECT uid, status, error, content_hash, stored_path, width, height, attempts, source_url "
        "FROM model_thumbnails",
    )
    return {r[0]: r[1:] for r in result}


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


EXPECTED_BY_FAULT = {
    ThumbnailFault.NO_THUMBNAILS: "[permanent] no thumbnail",
    ThumbnailFault.TRUNCATED_JPEG: "[permanent] truncated or corrupt image",
    ThumbnailFault.HTML_200: "[permanent] not an image: content type 'text/html'",
    ThumbnailFault.ZERO_BYTES: "[permanent] empty file",
    ThumbnailFault.HUGE_DIMENSIONS: "[permanent] decompression bomb",
    ThumbnailFault.NOT_FOUND: "[permanent] HTTP 404",
    ThumbnailFault.REDIRECT_OFFSITE: "[permanent] redirect refused: host not allowed",
    ThumbnailFault.WRONG_CONTENT_TYPE: "[permanent] not an image: content type 'text/plain'",
}


def test_every_broken_image_kind_is_recorded_and_the_rest_of_the_batch_succeeds(world):
    catalog = Catalog.generate(40, seed=2, faults=FaultConfig(broken_thumbnails=True))
    assert set(EXPECTED_BY_FAULT) == set(ThumbnailFault), "a new fault kind needs an expectation here"
    server, settings = world(catalog)
    stats = thumbnails.download_thumbnails(settings)
    got = rows(settings.db_url)
    assert set(got) == {m.uid for m in catalog.models}
    store = ArtifactStore(settings.thumbnail_store)
    for model in catalog.models:
        status, error, content_hash, stored_path, width, height, attempts, _ = got[model.uid]
        expected = EXPECTED_BY_FAULT.get(model.thumbnail_fault)
        if expected is None:
            assert (status, error, width, height) == ("ok", None, 256, 144), model.uid
            assert hashlib.sha256(store.get(stored_path)).hexdigest() == content_hash
        else:
            assert status == "failed" and error.startswith(expected), (model.thumbnail_fault, error)
            assert content_hash is None and attempts == 1
    broken = Counter(m.thumbnail_fault for m in catalog.models if m.thumbnail_fault)
    assert stats.fetched == 40 - sum(broken.values()) and stats.failed == sum(broken.values())
    assert sum(stats.failures_by_reason.values()) == stats.failed
    assert stats.failures_by_reason["[permanent] no thumbnail"] == broken[ThumbnailFault.NO_THUMBNAILS]
    assert len(stats.failures_by_reason) == len(set(EXPECTED_BY_FAULT.values())) - 1  # two 'not an image'

    requests_before = server.stats.count("thumbnail")
    again = thumbnails.download_thumbnails(settings)
    assert (again.candidates, again.fetched, again.failed) == (0, 0, 0)
    assert again.skipped_by_reason == {"up to date": stats.fetched, "permanent failure": stats.failed}
    assert server.stats.count("thumbnail") == requests_before and rows(settings.db_url) == got


def test_pixel_and_byte_caps(world):
    catalog = Catalog.generate(6, seed=31)
    wide = encode(Image.new("RGB", (3000, 3000), (9, 9, 9)), "PNG")
    noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    heavy = encode(Image.fromarray(noise), quality=95)
    bodies = {catalog.models[0].uid: ("image/png", wide), catalog.models[1].uid: ("image/jpeg", heavy)}
    assert len(wide) < 100_000 and len(heavy) > 100_000
    _, settings = world(
        catalog, FaultConfig(thumbnail_bodies=bodies), max_image_pixels=4_000_000, max_image_bytes=100_000
    )
    stats = thumbnails.download_thumbnails(settings)
    got = rows(settings.db_url)
    assert got[catalog.models[0].uid][1].startswith(
        "[permanent] too many pixels: image is 3000x3000 = 9000000 pixels, over the 4000000 cap"
    )
    assert got[catalog.models[1].uid][1] == f"[permanent] too large: {len(heavy)} bytes, over the 100000 cap"
    assert stats.fetched == 4 and stats.failed == 2


def test_modes_and_orientation_are_normalised_and_source_bytes_kept(world):
    catalog = Catalog.generate(10, seed=32)
    rotated = Image.new("RGB", (64, 36), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees
    palette = Image.new("P", (64, 36), 0)
    palette.info["transparency"] = 0
    grey16 = Image.fromarray((np.arange(64 * 36).reshape(36, 64) * 28).astype(np.uint16))
    samples = {
        "cmyk": ("image/jpeg", encode(Image.new("CMYK", (64, 36), (0, 255, 255, 0)))),
        "grey": ("image/jpeg", encode(Image.new("L", (64, 36), 128))),
        "palette_alpha": ("image/png", encode(palette, "PNG")),
        "rgba": ("image/png", encode(Image.new("RGBA", (64, 36), (255, 0, 0, 0)), "PNG")),
        "grey16": ("image/png", encode(grey16, "PNG")),
        "exif_rotated": ("image/jpeg", encode(rotated, exif=exif.tobytes())),
        "webp": ("image/webp", encode(Image.new("RGB", (64, 36), (0, 200, 0)), "WEBP")),
        "tiff": ("image/tiff", encode(Image.new("RGB", (64, 36)), "TIFF")),
        "gif": ("image/gif", encode(Image.new("P", (64, 36)), "GIF")),
    }
    uid_of = {name: m.uid for name, m in zip(samples, catalog.models, strict=False)}
    bodies = {uid_of[name]: body for name, body in samples.items()}
    _, settings = world(catalog, FaultConfig(thumbnail_bodies=bodies))
    thumbnails.download_thumbnails(settings)
    got = rows(settings.db_url)
    store = ArtifactStore(settings.thumbnail_store)
    for name in ("tiff", "gif"):
        assert got[uid_of[name]][1].startswith("[permanent] not a decodable image (JPEG, PNG, WEBP)"), name
    images = {}
    for name in samples.keys() - {"tiff", "gif"}:
        status, error, content_hash, stored_path, width, height, *_ = got[uid_of[name]]
        assert status == "ok", (name, error)
        data = store.get(stored_path)
        assert data == samples[name][1], "the source bytes are stored, content-addressed"
        images[name] = to_rgb(open_checked(data, 10**6))
        assert images[name].mode == "RGB" and (width, height) == images[name].size
    assert images["exif_rotated"].size == (36, 64)
    assert images["rgba"].getpixel((0, 0)) == (255, 255, 255), "transparent flattened onto white"
    assert images["palette_alpha"].getpixel((0, 0)) == (255, 255, 255)
    assert images["cmyk"].getpixel((5, 5))[0] > 200 and images["cmyk"].getpixel((5, 5))[1] < 60
    values = np.asarray(images["grey16"])[..., 0]
    assert values.min() == 0 and 200 < values.max() < 255, "16-bit scaled, not clipped to white"


def test_identical_images_are_stored_once(world):
    catalog = Catalog.generate(8, seed=33)
    same = encode(Image.new("RGB", (64, 36), (1, 2, 3)))
    bodies = {m.uid: ("image/jpeg", same) for m in catalog.models[:3]}
    _, settings = world(catalog, FaultConfig(thumbnail_bodies=bodies))
    thumbnails.download_thumbnails(settings)
    got = rows(settings.db_url)
    hashes = {got[m.uid][2] for m in catalog.models[:3]}
    assert hashes == {hashlib.sha256(same).hexdigest()}
    store = ArtifactStore(settings.thumbnail_store)
    files = [p for p in store.fs.find(store.root) if p.endswith(".jpg")]
    assert len(files) == len({r[2] for r in got.values()}) == 6
    assert not [p for p in store.fs.find(store.root) if p.endswith(".tmp")]


def test_fsspec_url_store(world, tmp_path):
    root = f"memory://thumbs-{uuid.uuid4().hex}"
    _, settings = world(Catalog.generate(5, seed=34), thumbnail_store=root)
    stats = thumbnails.download_thumbnails(settings)
    assert stats.fetched == 5
    fs = fsspec.filesystem("memory")
    for _, _, content_hash, stored_path, *_ in rows(settings.db_url).values():
        data = fs.cat_file(f"{root.removeprefix('memory://')}/{stored_path}")
        assert hashlib.sha256(data).hexdigest() == content_hash
    assert not (tmp_path / "store").exists(), "nothing written locally"


def test_a_store_that_refuses_every_write_fails_the_task_after_recording_why(world, tmp_path):
    not_a_directory = tmp_path / "store-is-a-file"
    not_a_directory.write_text("")
    _, settings = world(Catalog.generate(4, seed=35), thumbnail_store=str(not_a_directory))
    with pytest.raises(thumbnails.download.StoreUnavailable, match="refused all 4 writes"):
        thumbnails.download_thumbnails(settings)
    recorded = rows(settings.db_url)
    assert len(recorded) == 4
    assert all(
        r[0] == "failed" and r[1].startswith("[transient] store write failed") for r in recorded.values()
    )


def test_hosts_outside_the_allow_list_are_never_contacted(world):
    server, settings = world(Catalog.generate(6, seed=35), thumbnail_hosts=("media.sketchfab.com",))
    stats = thumbnails.download_thumbnails(settings)
    assert stats.failures_by_reason == {"[permanent] host not allowed": 6}
    assert server.stats.count("thumbnail") == 0


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("http://localhost:{port}{path}?redirected=1", None),
        ("{path}?redirected=1", None),
        ("http://127.0.0.2:{port}{path}?redirected=1", "[permanent] redirect refused: host not allowed"),
        ("//127.0.0.1:{port}{path}?redirected=1", "[permanent] redirect refused: host not allowed"),
        (
            "http://localhost@127.0.0.2:{port}{path}",
            "[permanent] redirect refused: bad URL: URL carries credentials",
        ),
        ("http://2130706433:{port}{path}", "[permanent] redirect refused: host not allowed"),
        ("http://[::1]:{port}{path}", "[permanent] redirect refused: host not allowed"),
        ("http://localhost.:{port}{path}", "[permanent] redirect refused: host not allowed"),
        ("file:///etc/passwd", "[permanent] redirect refused: scheme not allowed"),
        ("http://localhost:{port}{path}", "[permanent] too many redirects"),
    ],
)
def test_redirects_are_checked_hop_by_hop(world, location, expected):
    server, settings = world(Catalog.generate(3, seed=36), FaultConfig(thumbnail_redirect=location))
    thumbnails.download_thumbnails(settings)
    errors = [r[1] for r in rows(settings.db_url).values()]
    assert len(errors) == 3
    if expected is None:
        assert errors == [None] * 3
        assert server.stats.count("thumbnail", 302) == server.stats.count("thumbnail", 200) == 3
    else:
        assert all(e.startswith(expected) for e in errors), errors


@pytest.mark.parametrize("private_ok", [False, True])
def test_an_allowed_name_resolving_to_a_private_address_is_refused(world, monkeypatch, private_ok):
    """DNS says media.example.test is 127.0.0.1 (rebinding, poisoned record): the connection is checked."""
    real = socket.getaddrinfo

    def resolve(host, *args, **kw):
        return real("127.0.0.1" if host == "media.example.test" else host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    private = ("media.example.test",) if private_ok else ("localhost",)
    server, settings = world(
        Catalog.generate(4, seed=37), media_host="media.example.test", thumbnail_private_hosts=private
    )
    # The test server's port stands for the web port (only that port of a public host is allowed).
    monkeypatch.setitem(fetch.DEFAULT_PORTS, "http", server.port)
    stats = thumbnails.download_thumbnails(settings)
    if private_ok:
        assert stats.fetched == 4
    else:
        assert stats.failures_by_reason == {"[permanent] private address": 4}
        error = next(iter(rows(settings.db_url).values()))[1]
        assert "'media.example.test' resolved to non-public address 127.0.0.1" in error
        assert server.stats.count("thumbnail") == 0, "refused before a byte was sent"


def test_transient_media_errors_are_retried_within_the_run(world):
    # One worker, so the every-other-request failures land deterministically on first attempts.
    server, settings = world(
        Catalog.generate(12, seed=38),
        FaultConfig(media_error_rate=0.5),
        download_retries=2,
        download_workers=1,
    )
    stats = thumbnails.download_thumbnails(settings)
    assert stats.fetched == 12 and stats.failed == 0
    assert server.stats.count("thumbnail", 503) + server.stats.count("thumbnail", 500) >= 6


def test_transient_failures_are_retried_on_later_runs_up_to_the_maximum(world):
    catalog = Catalog.generate(5, seed=39)
    server, settings = world(
        catalog, FaultConfig(media_error_rate=1.0), download_retries=0, max_download_attempts=3
    )
    for attempt in (1, 2, 3):
        stats = thumbnails.download_thumbnails(settings)
        assert stats.failed == 5 and set(stats.failures_by_reason) <= {
            "[transient] HTTP 503",
            "[transient] HTTP 500",
        }
        assert {r[6] for r in rows(settings.db_url).values()} == {attempt}
    exhausted = thumbnails.download_thumbnails(settings)
    assert exhausted.candidates == 0 and exhausted.skipped_by_reason == {"attempts exhausted": 5}
    server.set_faults(FaultConfig())
    patient = thumbnails.download_thumbnails(settings.with_overrides(max_download_attempts=4))
    assert patient.fetched == 5 and {r[0] for r in rows(settings.db_url).values()} == {"ok"}


def test_a_changed_thumbnail_url_is_fetched_again(world):
    catalog = Catalog.generate(6, seed=40)
    _, settings = world(catalog)
    thumbnails.download_thumbnails(settings)
    before = rows(settings.db_url)
    changed = catalog.models[2]
    changed.thumbnails = (Thumbnail(changed.thumbnails[0].uid, 320, 180, 9000),)
    crawl.crawl(settings, CrawlWindow(), checkpoint_key="recrawl")
    stats = thumbnails.download_thumbnails(settings)
    after = rows(settings.db_url)
    assert stats.candidates == 1 and stats.fetched == 1 and stats.skipped == 5
    assert after[changed.uid][7].endswith("/320x180.jpeg") and after[changed.uid][4:6] == (320, 180)
    assert after[changed.uid][2] != before[changed.uid][2]
    assert {u: r for u, r in after.items() if u != changed.uid} == {
        u: r for u, r in before.items() if u != changed.uid
    }


def due(db_url: str) -> set[str]:
    return {r[0] for r in query(db_url, "SELECT uid FROM thumbnails_due")}


def test_a_plan_reads_only_models_marked_due_and_unmarks_the_settled_ones(world):
    catalog = Catalog.generate(8, seed=42)
    _, settings = world(catalog)
    uids = {m.uid for m in catalog.models}
    assert due(settings.db_url) == uids  # new models
    assert thumbnails.download_thumbnails(settings).fetched == 8
    assert due(settings.db_url) == uids  # sent to download: unmarked once a plan sees the result
    settled = plan_downloads(settings)
    assert settled.tasks == [] and settled.skipped_by_reason == {"up to date": 8}
    assert due(settings.db_url) == set()
    idle = plan_downloads(settings)
    assert idle.tasks == [] and not idle.skipped_by_reason  # nothing marked: nothing read

    removed = catalog.models[3].uid  # a removed thumbnail row marks its model again (trigger)
    execute(settings.db_url, "DELETE FROM model_thumbnails WHERE uid = %s", (removed,))
    assert [t.uid for t in plan_downloads(settings).tasks] == [removed]

    back = catalog.models[5].uid  # a model back after a deletion is looked at again (crawl upsert)
    execute(settings.db_url, "UPDATE sketchfab_models SET deleted_at = now() WHERE uid = %s", (back,))
    execute(settings.db_url, "INSERT INTO thumbnails_due VALUES (%s), (%s)", (back, "f" * 32))
    assert [t.uid for t in plan_downloads(settings).tasks] == [removed]  # deleted or gone: dropped
    assert due(settings.db_url) == {removed}
    crawl.crawl(settings, CrawlWindow(), checkpoint_key="recrawl")
    assert due(settings.db_url) == {removed, back}
    assert thumbnails.download_thumbnails(settings).fetched == 1  # its stored thumbnail is still good
    assert due(settings.db_url) == {removed}
    assert plan_downloads(settings).skipped_by_reason == {"up to date": 1} and due(settings.db_url) == set()


def test_changed_plan_settings_look_at_every_model_once(world):
    catalog = Catalog.generate(6, seed=43)
    _, settings = world(catalog)
    thumbnails.download_thumbnails(settings)
    plan_downloads(settings)
    assert due(settings.db_url) == set()
    bigger = settings.with_overrides(input_size=settings.input_size * 2)
    plan = plan_downloads(bigger)
    assert plan.looked_at == 6
    assert {t.uid for t in plan.tasks} == due(settings.db_url)
    assert plan_downloads(bigger).tasks == plan.tasks  # the same settings again: only what is still due
    more_attempts = settings.with_overrides(max_download_attempts=settings.max_download_attempts + 1)
    again = plan_downloads(more_attempts)
    assert again.looked_at == 6


def test_a_model_is_unmarked_only_if_its_thumbnail_list_is_still_the_one_judged(world):
    catalog = Catalog.generate(2, seed=44)
    _, settings = world(catalog)
    uid = catalog.models[0].uid
    with connect(settings.db_url) as conn, conn.cursor() as cur:
        assert settle(cur, [(uid, "[]")]) == 0  # judged on a list the crawl has since replaced
    assert uid in due(settings.db_url)


def test_the_plan_reads_the_listed_models_through_primary_keys_not_whole_tables(make_settings):
    settings = make_settings()
    add_catalogue(settings.db_url, 20000)
    for sql in (
        "DELETE FROM thumbnails_due WHERE uid > lpad(to_hex(20), 32, '0')",
        "ANALYZE sketchfab_models, model_thumbnails, thumbnails_due",
    ):
        execute(settings.db_url, sql)
    assert len(due(settings.db_url)) == 20  # the trigger listed every new model
    for shard in (WHOLE, Shard(1, 4)):
        plan = "\n".join(r[0] for r in query(settings.db_url, "EXPLAIN " + plan_query(shard)))
        assert "Seq Scan on sketchfab_models" not in plan and "Seq Scan on model_thumbnails" not in plan, plan


def test_shards_split_the_work_without_overlap(world):
    catalog = Catalog.generate(30, seed=41)
    _, settings = world(catalog)
    fetched = [thumbnails.download_thumbnails(settings, shard=shard).fetched for shard in Shard.all(3)]
    assert sum(fetched) == 30 and all(fetched)
    assert {r[0] for r in rows(settings.db_url).values()} == {"ok"} and len(rows(settings.db_url)) == 30


def test_hostile_image_corpus_over_http_is_kept_or_refused_and_never_breaks_the_batch(world):
    from hostile_images import corpus
    from sketchfab_similarity.core.images import decode_for_model
    from sketchfab_similarity.core.runs import failed_stages

    samples = corpus()
    catalog = Catalog.generate(60, seed=35)
    uid_of = {name: m.uid for name, m in zip(samples, catalog.models, strict=False)}
    bodies = {uid_of[name]: (ctype, data) for name, (ctype, data, _) in samples.items()}
    _, settings = world(catalog, FaultConfig(thumbnail_bodies=bodies))
    stats = thumbnails.download_thumbnails(settings)
    got = rows(settings.db_url)
    store = ArtifactStore(settings.thumbnail_store)
    refused = 0
    for name, (_, data, expected) in samples.items():
        status, error, _, stored_path, *_ = got[uid_of[name]]
        if expected is None:
            assert status == "ok", (name, error)
            assert store.get(stored_path) == data
            assert decode_for_model(store.get(stored_path), 32).shape == (32, 32, 3), name
        else:
            refused += 1
            assert status == "failed" and expected in error, (name, error)
    good = [m.uid for m in catalog.models if m.uid not in bodies]
    assert all(got[u][0] == "ok" for u in good), "nothing good is lost"
    assert stats.failed == refused == 9 and stats.fetched == 51
    counts = {"download_thumbnails": {"fetched": stats.fetched, "failed": stats.failed}}
    assert failed_stages(counts, settings.failure_max_share, settings.failure_min_items) == {}, (
        "run stays green"
    )
