from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from sketchfab_similarity.core.settings import (
    Settings,
    api_base_url_from_connection,
    db_connect_args,
    db_url_from_connection,
    describe,
    parse_variable,
    split_store_conn_id,
    store_options_from_connection,
)


def conn(**kw):
    base = dict(
        host=None, login=None, password=None, port=None, schema=None, conn_type="postgres", extra_dejson={}
    )
    base.update(kw)
    return SimpleNamespace(**base)


def connect_args(url: str) -> dict:
    """What psycopg2.connect() receives for this URL (SQLAlchemy's own translation)."""
    engine = sa.create_engine(url)
    try:
        return engine.dialect.create_connect_args(engine.url)[1]
    finally:
        engine.dispose()


def test_socket_directory_in_the_host_field_reaches_libpq():
    """The form a new user writes: {"conn_type": "postgres", "host": "/run/postgresql", ...}."""
    c = conn(host="/run/postgresql", login="airflow", schema="similarity")
    assert db_connect_args(c) == {"host": "/run/postgresql", "user": "airflow", "dbname": "similarity"}
    assert connect_args(db_url_from_connection(c)) == {
        "host": "/run/postgresql",
        "user": "airflow",
        "dbname": "similarity",
    }


def test_socket_directory_in_the_host_extra():
    c = conn(login="postgres", schema="postgres", extra_dejson={"host": "/run/pg"})
    assert db_url_from_connection(c) == "postgresql+psycopg2://postgres@/postgres?host=%2Frun%2Fpg"


def test_extras_reach_libpq_as_postgres_hook_passes_them():
    c = conn(
        host="db",
        port=5433,
        login="u",
        password="p@ss/w:rd",
        schema="sim",
        extra_dejson={"sslmode": "require", "options": "-c statement_timeout=5000", "cursor": "dictcursor",
                      "iam": False, "connect_timeout": 7},
    )  # fmt: skip
    expected = {
        "host": "db",
        "port": "5433",
        "user": "u",
        "password": "p@ss/w:rd",
        "dbname": "sim",
        "sslmode": "require",
        "options": "-c statement_timeout=5000",
        "connect_timeout": "7",
    }
    assert db_connect_args(c) == expected, "the hook's own extras (cursor, iam) are not libpq keywords"
    assert connect_args(db_url_from_connection(c)) == expected


def test_connect_args_match_the_postgres_providers_hook():
    """Same keywords as PostgresHook.get_conn() hands psycopg2, for the same connection."""
    from airflow.models import Connection
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    c = Connection(
        conn_id="similarity_db",
        conn_type="postgres",
        host="/run/postgresql",
        login="airflow",
        password="pw",
        schema="similarity",
        port=5432,
        extra={"options": "-c search_path=public", "sslmode": "disable", "cursor": "dictcursor"},
    )
    hook = PostgresHook(connection=c)
    seen: dict = {}
    hook._create_connection = lambda args: seen.update(args)
    hook.get_conn()
    seen.pop("cursor_factory", None), seen.pop("row_factory", None)
    assert db_connect_args(c) == {k: str(v) for k, v in seen.items() if v is not None}


def test_store_connection_in_the_url_as_object_storage_paths_name_it():
    assert split_store_conn_id("s3://thumbs_s3@bucket/thumbnails") == ("s3://bucket/thumbnails", "thumbs_s3")
    assert split_store_conn_id("s3://bucket/thumbnails") == ("s3://bucket/thumbnails", None)
    assert split_store_conn_id("/data/thumbnails") == ("/data/thumbnails", None)
    assert split_store_conn_id("file:///data/x@y") == ("file:///data/x@y", None)


def test_store_options_from_an_aws_connection():
    c = conn(
        conn_type="aws",
        login="AKIA",
        password="secret",
        extra_dejson={"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
    )
    assert store_options_from_connection(c) == {
        "key": "AKIA",
        "secret": "secret",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
    }
    nested = conn(conn_type="aws", extra_dejson={"service_config": {"s3": {"endpoint_url": "http://h:1"}}})
    assert store_options_from_connection(nested) == {"client_kwargs": {"endpoint_url": "http://h:1"}}
    other = conn(conn_type="generic", extra_dejson={"storage_options": {"token": "anon"}})
    assert store_options_from_connection(other) == {"token": "anon"}


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
    s = Settings(
        db_url="postgresql+psycopg2://u:se%40cret@/x?host=db",
        api_token="tok",
        thumbnail_store_options={"key": "AKIA", "secret": "s3cr3t", "client_kwargs": {}},
    )
    d = describe(s)
    assert "se%40cret" not in str(d) and "tok" not in str(d.values()) and "AKIA" not in str(d)
    assert "s3cr3t" not in str(d)
    assert "s3cr3t" not in repr(s)
