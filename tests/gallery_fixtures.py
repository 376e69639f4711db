"""A small database filled by the real pipeline stages, with hostile model data, for the gallery tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fake_sketchfab import Catalog, start_server
from sketchfab_similarity import crawl, features, similarity, thumbnails, vectors
from sketchfab_similarity.core import runs
from sketchfab_similarity.core.settings import Settings

EVIL_NAME = "<script>alert('name')</script><img src=x onerror=alert(1)> & \"quotes\""
WILDCARD_NAME = "50% off_sale"
EVIL_VIEWER_URL = "javascript:alert(document.cookie)"


@dataclass(frozen=True)
class GalleryData:
    settings: Settings
    catalog: Catalog
    evil_uid: str
    wildcard_uid: str


def as_xcom(result):
    """A stage's result as its task returns it (mapped tasks: a list of them)."""
    return [asdict(r) for r in result] if isinstance(result, list) else asdict(result)


def fill_database(settings_factory, n_models: int = 14) -> GalleryData:
    """Crawl, download, extract, load and refresh `n_models` models through the stage functions."""
    catalog = Catalog.generate(n_models, seed=11)
    evil, wildcard = catalog.models[1], catalog.models[4]
    evil.name = EVIL_NAME
    evil.json_overrides = {"viewerUrl": EVIL_VIEWER_URL}
    wildcard.name = WILDCARD_NAME
    with start_server(catalog) as server:
        settings = settings_factory(api_base_url=server.api_base_url, thumbnail_hosts=(server.media_host,))
        crawled = crawl.crawl(settings, crawl.CrawlWindow())
        downloaded = thumbnails.download_thumbnails(settings)
    extracted = features.extract_features(settings)
    loaded = vectors.load_vectors(settings, extracted.files)
    refreshed = similarity.refresh_similarity(settings)
    # The summary a run records: each stage's XCom (the dataclass as a dict) through run_counts, as
    # summarize_run does, so the page shows what a real run records.
    results = (crawled, [downloaded], [extracted], loaded, [refreshed])
    feature_version, counts = runs.run_counts(dict(zip(runs.STAGES, map(as_xcom, results), strict=True)))
    runs.record_run(
        settings.db_url,
        dag_id="sketchfab_visual_similarity",
        run_id="manual__2026-01-02T03:04:05+00:00",
        run_type="manual",
        data_interval=(None, None),
        feature_version=feature_version,
        counts=counts,
    )
    return GalleryData(settings, catalog, evil.uid, wildcard.uid)
