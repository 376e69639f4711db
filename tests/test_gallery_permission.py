"""The gallery plugin lets in only users who may read the DAG's runs (Airflow's auth manager decides)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.integration  # imports Airflow


@pytest.fixture
def plugin(monkeypatch):
    import similarity_gallery_plugin as plugin
    from airflow.api_fastapi.core_api import security
    from airflow.models.dag import DagModel

    asked: list[tuple] = []

    class AuthManager:
        def is_authorized_dag(self, *, method, access_entity, details, user):
            asked.append((method, access_entity.name, details.id, user.name))
            return user.name == "reader"

    monkeypatch.setattr(security, "get_auth_manager", lambda: AuthManager())
    monkeypatch.setattr(DagModel, "get_team_name", staticmethod(lambda dag_id: None))
    return plugin, asked


def client_as(plugin, name: str) -> TestClient:
    from airflow.api_fastapi.core_api.security import get_user
    from sketchfab_similarity.core.settings import Settings
    from sketchfab_similarity.gallery.app import create_app

    app = create_app(
        lambda: Settings(db_url="postgresql+psycopg2:///none"), [plugin._readers_of_the_dag_only()]
    )
    app.dependency_overrides[get_user] = lambda: SimpleNamespace(name=name)
    return TestClient(app)


def test_only_users_who_may_read_the_dag_see_the_gallery(plugin):
    plugin, asked = plugin
    assert client_as(plugin, "stranger").get("/gallery.css").status_code == 403
    assert client_as(plugin, "reader").get("/gallery.css").status_code == 200
    assert asked == [
        ("GET", "RUN", "sketchfab_visual_similarity", "stranger"),
        ("GET", "RUN", "sketchfab_visual_similarity", "reader"),
    ]


def test_the_permission_is_the_pipeline_dags():
    import devenv
    import similarity_gallery_plugin as plugin

    assert plugin.DAG_ID == devenv.DAG_ID
