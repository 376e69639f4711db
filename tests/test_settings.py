from types import SimpleNamespace

import pytest
from sketchfab_similarity.core.settings import (
    Settings,
    api_base_url_from_connection,
    db_url_from_connection,
    describe,
    parse_variable,
)


def conn(**kw):
    base = dict(
        host=None, login=None, password=None, port=None, schema=None, conn_type="postgres", extra_dejson={}
    )
    base.update(kw)
    return SimpleNamespace(**base)


def test_unix_socket_host_from_query_string():
    url = db_url_from_connection(conn(login="postgres", schema="postgres", extra_dejson={"host": "/run/pg"}))
    assert url == "postgresql+psycopg2://postgres@/postgres?host=%2Frun%2Fpg"


def test_tcp_connection_with_password_and_unknown_extras_dropped():
    url = db_url_from_connection(
        conn(
            host="db",
            port=5432,
            login="u",
            password="p@ss",
            schema="sim",
            extra_dejson={"sslmode": "require", "cursor": "x"},
        )
    )
    assert url == "postgresql+psycopg2://u:p%40ss@db:5432/sim?sslmode=require"


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, "https://api.sketchfab.com"),
        ({"host": "127.0.0.1", "port": 8765, "conn_type": "http"}, "http://127.0.0.1:8765"),
        ({"host": "api.example.com", "schema": "https", "conn_type": "http"}, "https://api.example.com"),
        ({"host": "http://127.0.0.1:9/", "conn_type": "http"}, "http://127.0.0.1:9"),
    ],
)
def test_api_base_url(kw, expected):
    assert api_base_url_from_connection(conn(**kw)) == expected


def test_variables_are_typed_with_clear_errors():
    assert parse_variable("similarity_thumbnail_hosts", " Media.Sketchfab.com, localhost ,") == (
        "media.sketchfab.com",
        "localhost",
    )
    assert parse_variable("similarity_input_size", "64") == 64
    with pytest.raises(ValueError, match="similarity_input_size must be an integer"):
        parse_variable("similarity_input_size", "big")


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match=">= 32"):
        Settings(input_size=16)
    with pytest.raises(ValueError, match="at least one host"):
        Settings(thumbnail_hosts=())


def test_describe_masks_secrets():
    s = Settings(db_url="postgresql+psycopg2://u:secret@db/x", api_token="tok")
    d = describe(s)
    assert "secret" not in str(d) and "tok" not in str(d.values())
