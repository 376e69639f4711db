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
