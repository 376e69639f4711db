"""Airflow plugin: the similarity gallery, served by the API server and linked from the UI's navigation.

The gallery reads the `similarity_db` connection and the `similarity_*` Variables like
the DAG does; only signed-in Airflow users who may read the DAG's runs can open it (it shows
what those runs produced): others are sent to the login page, or refused with 403.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import RedirectResponse
from sketchfab_similarity.core.settings import settings_from_airflow
from sketchfab_similarity.gallery.app import cached, create_app
from starlette.exceptions import HTTPException

URL_PREFIX = "/similarity-gallery"
DAG_ID = "sketchfab_visual_similarity"
"""The DAG whose results the gallery shows: its read permission decides who may see them."""


def _readers_of_the_dag_only():
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return requires_access_dag("GET", DagAccessEntity.RUN, DAG_ID)


async def _login_first(request: Request, exc: HTTPException):
    """Send a browser without an Airflow session to the login page, then back here."""
    if exc.status_code == 401 and request.method == "GET":
        from airflow.api_fastapi.app import get_auth_manager

        return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
    return await http_exception_handler(request, exc)


gallery_app = create_app(cached(settings_from_airflow), dependencies=[_readers_of_the_dag_only()])
gallery_app.add_exception_handler(HTTPException, _login_first)


class SimilarityGalleryPlugin(AirflowPlugin):
    name = "similarity_gallery"
    fastapi_apps = [{"app": gallery_app, "url_prefix": URL_PREFIX, "name": "Similarity gallery"}]
    external_views = [
        {
            "name": "Similarity gallery",
            "href": f"{URL_PREFIX}/",
            "url_route": "similarity-gallery",
            "destination": "nav",
            "nav_top_level": True,
            "icon": f"{URL_PREFIX}/icon.svg",
        }
    ]
