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


@pytest.mark.integration  # imports Airflow
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


def test_readme_variables_table_is_generated_from_the_settings():
    import docs
    from sketchfab_similarity.core.settings import markdown_table

    assert docs.readme_table(docs.README.read_text()) == markdown_table(), "run `make docs`"


def test_every_setting_says_what_it_is_and_where_it_comes_from():
    from sketchfab_similarity.core.settings import SETTINGS_INFO, VARIABLES, variables_read

    for name, info in SETTINGS_INFO.items():
        assert len(info.doc) > 15, name
        assert info.read in ("connection", "task", "parse", "env", "internal"), name
    assert set(VARIABLES) == set(variables_read("task", "parse", "env"))
    # DESIGN.md's contract Variables.
    contract = {"thumbnail_store", "thumbnail_hosts", "vgg16_weights", "input_size"}
    assert {f"similarity_{n}" for n in contract} <= set(VARIABLES)
    # What shapes the DAG is read at parse time, nothing else.
    assert set(variables_read("parse")) == {
        f"similarity_{n}"
        for n in (
            "schedule", "catchup", "gpu_pool", "gpu_queue", "task_retries", "retry_delay_s",
            "max_retry_delay_s", "task_timeout_minutes", "run_wait_poke_s", "run_wait_timeout_hours",
        )
    }  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"feature_pooling": "median"}, "similarity_feature_pooling must be one of avg, max; got 'median'"),
        ({"refresh_engine": "cuda"}, "similarity_refresh_engine must be one of auto, numpy, keras"),
        ({"page_size": 25}, "page_size must be <= 24, got 25"),
        ({"top_n": 0}, "similarity_top_n must be >= 1, got 0"),
        ({"hnsw_m": 40}, "ef_construction >= 2 * m"),
    ],
)
def test_field_checks_come_from_the_metadata(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace("*", "\\*")):
        Settings(**overrides)


def test_variables_parse_by_field_type():
    assert parse_variable("similarity_catchup", "Yes") is True
    assert parse_variable("similarity_schedule", " @hourly ") == "@hourly"
    with pytest.raises(ValueError, match="similarity_catchup must be true or false"):
        parse_variable("similarity_catchup", "maybe")


def test_parse_time_settings_read_the_environment_not_task_variables():
    from sketchfab_similarity.core.settings import environment_values

    assert environment_values(
        {"AIRFLOW_VAR_SIMILARITY_REFRESH_PARTS": "4", "AIRFLOW_VAR_SIMILARITY_TOP_N": "3"}
    ) == {"refresh_parts": 4}


def test_database_password_is_not_in_repr():
    assert "secret" not in repr(Settings(db_url="postgresql+psycopg2://u:secret@db/x"))
