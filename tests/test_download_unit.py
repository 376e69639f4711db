"""Unit tests of the downloader's rules: address policy, URL checks, retry decisions, caps, validation."""

from __future__ import annotations

import asyncio
import io
import socket
from email.utils import formatdate

import numpy as np
import pytest
from PIL import Image
from sketchfab_similarity.core import httpretry
from sketchfab_similarity.core.settings import Settings
from sketchfab_similarity.core.store import ArtifactStore
from sketchfab_similarity.thumbnails import download, fetch, plan
from sketchfab_similarity.thumbnails.download import validate_and_store
from sketchfab_similarity.thumbnails.fetch import FetchFailed
from sketchfab_similarity.thumbnails.plan import DownloadTask


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),  # cloud metadata service
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
    ],
)
def test_public_address_policy(address, public):
    assert fetch.is_public_address(address) is public


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://media.sketchfab.com/a.jpeg", None),
        ("http://MEDIA.sketchfab.com:80/a.jpeg", None),
        ("https://media.sketchfab.com:443/a.jpeg", None),
        ("http://MEDIA.sketchfab.com:8080/a.jpeg", "port not allowed"),
        ("https://media.sketchfab.com:6379/a.jpeg", "port not allowed"),
        ("ftp://media.sketchfab.com/a.jpeg", "scheme not allowed"),
        ("file:///etc/passwd", "scheme not allowed"),
        ("https://user:pw@media.sketchfab.com/a.jpeg", "bad URL"),
        ("https://media.sketchfab.com@169.254.169.254/a.jpeg", "bad URL"),
        ("https://media.sketchfab.com.evil.example/a.jpeg", "host not allowed"),
        ("https://169.254.169.254/latest/meta-data", "host not allowed"),
        ("https://media.sketchfab.com:99999/a.jpeg", "bad URL"),
        ("https:///a.jpeg", "host not allowed"),
    ],
)
def test_url_checks(url, kind):
    if kind is None:
        fetch.check_allowed(url, ("media.sketchfab.com",))
    else:
        with pytest.raises(FetchFailed, match=f"^{kind}"):
            fetch.check_allowed(url, ("media.sketchfab.com",))


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ((None, None, None, 0), None),  # never tried
        (("u", "ok", None, 1), "up to date"),
        (("old", "ok", None, 1), None),  # the chosen URL changed
        (("u", "failed", "[permanent] HTTP 404: Not Found", 1), "permanent failure"),
        (("u", "failed", "[transient] HTTP 503: after 2 retries", 2), None),
        (("u", "failed", "[transient] HTTP 503: after 2 retries", 3), "attempts exhausted"),
        (("old", "failed", "[permanent] HTTP 404: Not Found", 9), None),  # new URL, new chances
    ],
)
def test_skip_reasons(stored, expected):
    stored_url, status, error, attempts = stored
    assert plan.skip_reason("u", stored_url, status, error, attempts, max_attempts=3) == expected


def small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 36), (5, 6, 7)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = small_jpeg()
SETTINGS = Settings(thumbnail_hosts=("media.sketchfab.com",), max_image_bytes=10_000, download_deadline_s=0.2)
URL = "https://media.sketchfab.com/t.jpeg"


class Body:
    """Just enough of an aiohttp response for the body reader: headers and a chunked stream."""

    def __init__(self, chunks: list[bytes], headers: dict[str, str]) -> None:
        self.chunks = chunks
        self.headers = headers
        self.content = self

    async def _chunks(self):
        for chunk in self.chunks:
            yield chunk

    def iter_chunked(self, size: int):
        return self._chunks()


def test_byte_cap_holds_without_a_content_length():
    body = Body([b"\xff" * 4000] * 5, {"Content-Type": "image/jpeg"})  # only the stream tells
    with pytest.raises(FetchFailed, match="too large: over the 10000 byte cap"):
        asyncio.run(fetch._read_body(body, 10_000))


def test_declared_length_and_content_type_are_checked_before_reading():
    with pytest.raises(FetchFailed, match="too large: 20000 bytes, over the 10000 cap"):
        asyncio.run(
            fetch._read_body(Body([], {"Content-Type": "image/png", "Content-Length": "20000"}), 10_000)
        )
    with pytest.raises(FetchFailed, match="not an image: content type 'text/html'"):
        asyncio.run(fetch._read_body(Body([], {"Content-Type": "text/html; charset=utf-8"}), 10_000))


def test_a_hanging_server_hits_the_whole_download_deadline():
    class Hanging:
        def get(self, url, **kw):
            return self

        async def __aenter__(self):
            await asyncio.sleep(60)

        async def __aexit__(self, *exc):
            return False

    with pytest.raises(FetchFailed, match="too slow: over 0.2s") as info:
        asyncio.run(fetch.fetch_bytes(Hanging(), URL, SETTINGS))
    assert info.value.transient


def test_retry_delay_honours_capped_retry_after_else_backs_off_with_jitter(monkeypatch):
    assert httpretry.retry_delay(0, "3", 0.2, 10.0) == 3.0
    assert httpretry.retry_delay(0, "3600", 0.2, 10.0) == 10.0
    now = 1_800_000_000.0  # a fake clock: the HTTP date is read against it, no wall-clock slack
    monkeypatch.setattr(httpretry.time, "time", lambda: now)
    assert httpretry.retry_delay(0, formatdate(now + 5, usegmt=True), 0.2, 10.0) == 5.0
    assert httpretry.retry_delay(0, formatdate(now - 5, usegmt=True), 0.2, 10.0) == 0.0
    assert 0.8 <= httpretry.retry_delay(2, None, 0.2, 10.0) <= 1.0  # 0.2 * 2**2 plus up to 0.2 jitter
    assert 0.2 <= httpretry.retry_delay(0, "soon", 0.2, 10.0) <= 0.4, "unparseable: plain backoff"


def test_resolver_refuses_private_answers_for_hosts_not_listed(monkeypatch):
    answers = {"cdn.example": "93.184.216.34", "rebound.example": "10.0.0.7", "mirror.internal": "10.0.0.8"}
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **kw: real(answers.get(host, host), *a, **kw))

    async def resolve(host: str) -> list[str]:
        resolver = fetch.GuardedResolver(["mirror.internal"])  # needs a running loop
        return [a["host"] for a in await resolver.resolve(host, 443)]

    assert asyncio.run(resolve("cdn.example")) == ["93.184.216.34"]
    assert asyncio.run(resolve("mirror.internal")) == ["10.0.0.8"]
    with pytest.raises(fetch.PrivateAddressRefused, match="'rebound.example' resolved to non-public address"):
        asyncio.run(resolve("rebound.example"))


def test_private_ip_literals_need_the_private_list_too():
    with pytest.raises(FetchFailed, match="private address: 10.0.0.5 is not a public address"):
        fetch.check_allowed("http://10.0.0.5/t.jpeg", ("10.0.0.5",))
    fetch.check_allowed("http://10.0.0.5/t.jpeg", ("10.0.0.5",), private_hosts=("10.0.0.5",))
    fetch.check_allowed("http://93.184.216.34/t.jpeg", ("93.184.216.34",))
    # IPv6 forms that carry a private IPv4 address are not public: NAT64, 6to4, Teredo, mapped.
    for literal in (
        "64:ff9b::a00:1",
        "2002:a00:1::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "::ffff:10.0.0.1",
    ):
        with pytest.raises(FetchFailed, match="^private address"):
            fetch.check_allowed(f"http://[{literal}]/t.jpeg", (literal,))
    assert fetch.is_public_address("64:ff9b::808:808") and fetch.is_public_address("2002:808:808::1")
    fetch.check_allowed("http://localhost:51234/t.jpeg", ("localhost",), private_hosts=("localhost",))


def test_validation_turns_every_failure_into_a_recorded_result(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path))
    ok, new = validate_and_store(DownloadTask("a" * 32, URL), JPEG, store, SETTINGS)
    assert ok.status == "ok" and new and (ok.width, ok.height) == (64, 36) and ok.stored_path.endswith(".jpg")
    again, new = validate_and_store(DownloadTask("b" * 32, URL), JPEG, store, SETTINGS)
    assert again.content_hash == ok.content_hash and not new

    class BrokenStore(ArtifactStore):
        def put(self, key, data):
            raise PermissionError("read-only file system")

    failed, _ = validate_and_store(DownloadTask("c" * 32, URL), JPEG, BrokenStore(str(tmp_path)), SETTINGS)
    assert failed.error == "[transient] store write failed: PermissionError: read-only file system"
    noise = np.random.default_rng(1).integers(0, 255, (90, 160, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    rejected, _ = validate_and_store(DownloadTask("d" * 32, URL), cut, store, SETTINGS)
    assert rejected.error.startswith("[permanent] truncated or corrupt image: ")

    def explode(data, max_pixels, **_):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(download, "open_checked", explode)
    failed, _ = validate_and_store(DownloadTask("e" * 32, URL), JPEG, store, SETTINGS)
    assert failed.error == "[transient] unexpected error: RuntimeError: decoder bug"


def test_a_model_without_thumbnails_is_a_recorded_failure():
    result, _ = asyncio.run(download.download_one(DownloadTask("f" * 32, None), None, None, None, SETTINGS))
    assert result.error == "[permanent] no thumbnail: the model lists no images"


def test_reason_kind():
    assert download.reason_kind("[transient] HTTP 503: after 2 retries") == "[transient] HTTP 503"
    assert (
        download.reason_kind("[permanent] redirect refused: host not allowed: x")
        == "[permanent] redirect refused"
    )
