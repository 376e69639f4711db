"""Unit tests of the downloader's rules: address policy, URL checks, retry decisions, caps, the pool."""

from __future__ import annotations

import io
import threading
import time

import pytest
import requests
from PIL import Image
from sketchfab_similarity import thumbnails
from sketchfab_similarity.settings import Settings
from sketchfab_similarity.thumbnails import DownloadTask, FetchFailed, ThumbnailStore, download_one


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
    assert thumbnails.is_public_address(address) is public


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://media.sketchfab.com/a.jpeg", None),
        ("http://MEDIA.sketchfab.com:8080/a.jpeg", None),
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
        thumbnails.check_allowed(url, ("media.sketchfab.com",))
    else:
        with pytest.raises(FetchFailed, match=f"^{kind}"):
            thumbnails.check_allowed(url, ("media.sketchfab.com",))


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
    assert thumbnails.skip_reason("u", stored_url, status, error, attempts, max_attempts=3) == expected


def image_response(body: bytes, status: int = 200, ctype: str = "image/jpeg", **headers) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.headers.update({"Content-Type": ctype, **headers})
    resp.raw = io.BytesIO(body)
    return resp


class OneAnswer(requests.Session):
    def __init__(self, answer: requests.Response) -> None:
        super().__init__()
        self.answer = answer

    def get(self, url, **kw):
        return self.answer


def small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 36), (5, 6, 7)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = small_jpeg()
SETTINGS = Settings(thumbnail_hosts=("media.sketchfab.com",), max_image_bytes=10_000)
URL = "https://media.sketchfab.com/t.jpeg"


def test_byte_cap_holds_without_a_content_length():
    answer = image_response(b"\xff" * 20_000)  # no Content-Length header: only the stream tells
    with pytest.raises(FetchFailed, match="too large: over the 10000 byte cap"):
        thumbnails.fetch_bytes(OneAnswer(answer), URL, SETTINGS)


def test_a_trickling_download_hits_the_deadline():
    with pytest.raises(FetchFailed, match="too slow") as info:
        thumbnails._read_capped(image_response(b"x" * 100), 1000, deadline=time.monotonic() - 1)
    assert info.value.transient


def test_download_one_turns_every_failure_into_a_recorded_result(tmp_path, monkeypatch):
    store = ThumbnailStore(str(tmp_path))
    ok, new = download_one(DownloadTask("a" * 32, URL), OneAnswer(image_response(JPEG)), store, SETTINGS)
    assert ok.status == "ok" and new and (ok.width, ok.height) == (64, 36)

    class BrokenStore(ThumbnailStore):
        def put(self, key, data):
            raise PermissionError("read-only file system")

    failed, _ = download_one(
        DownloadTask("b" * 32, URL), OneAnswer(image_response(JPEG)), BrokenStore(str(tmp_path)), SETTINGS
    )
    assert failed.error == "[transient] store write failed: PermissionError: read-only file system"

    def explode(data, max_pixels):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(thumbnails, "open_checked", explode)
    failed, _ = download_one(DownloadTask("c" * 32, URL), OneAnswer(image_response(JPEG)), store, SETTINGS)
    assert failed.error == "[transient] unexpected error: RuntimeError: decoder bug"
    none, _ = download_one(DownloadTask("d" * 32, None), OneAnswer(image_response(JPEG)), store, SETTINGS)
    assert none.error == "[permanent] no thumbnail: the model lists no images"


def test_bounded_map_yields_everything_with_bounded_work_in_flight():
    lock, state = threading.Lock(), {"now": 0, "peak": 0, "submitted": 0}

    def items():
        for i in range(200):
            with lock:
                state["submitted"] += 1
            yield i

    def work(i: int) -> int:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.001)
        with lock:
            state["now"] -= 1
        return i * i

    results = []
    for r in thumbnails.bounded_map(work, items(), workers=4):
        results.append(r)
        assert state["submitted"] - len(results) <= 16, "at most 4x workers submitted ahead"
    assert sorted(results) == [i * i for i in range(200)] and state["peak"] <= 4


def test_reason_kind():
    assert thumbnails.reason_kind("[transient] HTTP 503: after 2 retries") == "[transient] HTTP 503"
    assert (
        thumbnails.reason_kind("[permanent] redirect refused: host not allowed: x")
        == "[permanent] redirect refused"
    )
