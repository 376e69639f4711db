"""Shared fixtures: a real embedded Postgres (one server, a fresh database per test) and real HTTP."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Airflow reads its home at import time: keep tests away from ~/airflow.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import devenv  # noqa: E402
from sketchfab_similarity.core import db  # noqa: E402
from sketchfab_similarity.core.settings import Settings  # noqa: E402

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """libpq URI of an embedded PostgreSQL with pgvector, started once per test session."""
    data_dir = tmp_path_factory.mktemp("pg") / "data"
    uri = devenv.start_postgres(data_dir)
    yield uri
    devenv.stop_postgres(data_dir)


@pytest.fixture
def fresh_db(pg_uri: str) -> Iterator[str]:
    """SQLAlchemy URL of a new, empty database with the schema applied."""
    url, _ = devenv.create_database(pg_uri, f"test_{os.getpid()}_{next(_db_counter)}")
    db.apply_schema(url)
    yield url
    db.get_engine(url).dispose()  # give its pooled connections back; the server allows only so many


@pytest.fixture
def make_settings(fresh_db: str, tmp_path: Path):
    """Settings for a stage test: fresh database, temporary store, small random-weight VGG16."""

    def make(**overrides) -> Settings:
        values = dict(
            db_url=fresh_db,
            thumbnail_store=str(tmp_path / "store"),
            thumbnail_hosts=("localhost",),
            vgg16_weights="random",
            input_size=32,
            top_n=5,
            download_workers=4,
        )
        values.update(overrides)
        return Settings(**values)

    return make
