"""All configuration in one place, with documented defaults.

Stage modules take a `Settings` object and never read Airflow themselves, so they
run and test without Airflow. `settings_from_airflow()` builds one from the
contract's connections (`sketchfab_api`, `similarity_db`) and Variables
(`similarity_*`, so `AIRFLOW_VAR_SIMILARITY_*` environment variables work).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import URL

API_CONN_ID = "sketchfab_api"
DB_CONN_ID = "similarity_db"
DEFAULT_API_BASE_URL = "https://api.sketchfab.com"
REFRESH_ENGINES = ("auto", "numpy", "keras")
HUBNESS_RERANKS = ("none", "csls")


def default_thumbnail_store() -> str:
    """Next to Airflow's own files, so a fresh install works without configuration."""
    airflow_home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
    return str(Path(airflow_home) / "similarity_thumbnails")


@dataclass(frozen=True)
class Settings:
    """Pipeline configuration. Field docs are the reference for the README's table."""

    db_url: str = ""
    """SQLAlchemy URL of the Postgres-with-pgvector database (from the `similarity_db` connection)."""
    api_base_url: str = DEFAULT_API_BASE_URL
    """Sketchfab API base URL (from the `sketchfab_api` connection's schema/host/port)."""
    api_token: str | None = field(default=None, repr=False)
    """Sketchfab API token (the `sketchfab_api` connection's password); optional."""
    thumbnail_store: str = field(default_factory=default_thumbnail_store)
    """Variable `similarity_thumbnail_store`: local path or fsspec URL (file://, s3://, ...)."""
    thumbnail_hosts: tuple[str, ...] = ("media.sketchfab.com",)
    """Variable `similarity_thumbnail_hosts`: the only hosts thumbnails may be fetched from."""
    vgg16_weights: str = "imagenet"
    """Variable `similarity_vgg16_weights`: `imagenet` | path to a weights file | `random`."""
    input_size: int = 224
    """Variable `similarity_input_size`: VGG16 input side in pixels (>= 32)."""
    top_n: int = 20
    """Variable `similarity_top_n`: rows kept per model in `model_similarity`."""
    random_seed: int = 0
    """Variable `similarity_random_seed`: seed used when weights are `random`."""
    crawl_overlap_minutes: int = 60
    """Variable `similarity_crawl_overlap_minutes`: re-read window below the watermark."""
    page_size: int = 24
    """Models per API page (24 is the API's maximum)."""
    download_workers: int = 32
    """Variable `similarity_download_workers`: thumbnail requests in flight at once (per task). At 20 ms
    per request, 16 cap a task near 750 thumbnails/s; 32 leave the CPU as the limit."""
    http_timeout_s: float = 20.0
    """Connect/read timeout for every HTTP request."""
    max_image_bytes: int = 10_000_000
    """Thumbnails larger than this are refused while streaming."""
    max_image_pixels: int = 40_000_000
    """Thumbnails with more pixels than this are refused before decoding (decompression bombs)."""
    max_download_attempts: int = 3
    """A thumbnail that failed for a transient reason is retried on later runs up to this many times."""
    api_retries: int = 6
    """Retries of one API request on connection errors, 429 and 5xx before the crawl task fails
    (Airflow's task retry then resumes from the checkpoint)."""
    api_backoff_s: float = 0.5
    """Base of the exponential backoff between API retries (doubling, plus up to as much random jitter)."""
    api_retry_after_cap_s: float = 120.0
    """Longest sleep honoured for one `Retry-After` (a misbehaving proxy may ask for hours)."""
    api_body_retries: int = 2
    """Retries of a 200 response that is not JSON (a proxy's error page) before it is an error."""
    api_pace_below: int = 3
    """When `X-RateLimit-Remaining` drops below this, spread the rest of the window until its reset."""
    api_max_pace_sleep_s: float = 60.0
    """Longest pause taken for pacing on rate-limit headers."""
    download_retries: int = 2
    """Retries of one thumbnail request on connection errors, 429 and 5xx within a run."""
    download_backoff_s: float = 0.2
    """Base of the exponential backoff between thumbnail retries."""
    download_retry_after_cap_s: float = 10.0
    """Longest `Retry-After` a download worker waits; beyond it the row fails as transient for a later run."""
    download_deadline_s: float = 60.0
    """Whole-download time limit for one thumbnail (a server trickling bytes cannot hold a worker)."""
    thumbnail_private_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    """Variable `similarity_thumbnail_private_hosts`: allow-listed hosts that may resolve to private,
    loopback or link-local addresses (local mirrors, the demo). Any other host doing so is refused."""
    extract_batch_size: int = 32
    """Variable `similarity_extract_batch_size`: images per forward pass on the CPU."""
    gpu_batch_size: int = 256
    """Variable `similarity_gpu_batch_size`: images per forward pass when a GPU is used."""
    feature_layer: str = "block5_pool"
    """Variable `similarity_feature_layer`: VGG16 layer whose output is pooled (any 512-channel
    layer, block4_conv1 .. block5_pool). Part of the feature version."""
    feature_pooling: str = "avg"
    """Variable `similarity_feature_pooling`: global `avg` or `max` pooling. Part of the feature version."""
    resize_mode: str = "squash"
    """Variable `similarity_resize_mode`: `squash` (whole frame to a square, as the original post)
    or `center_crop` (keeps aspect). Part of the feature version."""
    resize_interpolation: str = "bilinear"
    """Variable `similarity_resize_interpolation`: nearest | bilinear | bicubic | hamming | box |
    lanczos, as keras.utils.load_img names them (its default is nearest). Part of the feature version."""
    jpeg_decode: str = "reduced"
    """Variable `similarity_jpeg_decode`: `reduced` decodes JPEGs at 1/2..1/8 scale when still
    >= the input size (fast); `full` decodes every pixel. Part of the feature version."""
    extract_precision: str = "float32"
    """Variable `similarity_extract_precision`: float32 | mixed_float16 | mixed_bfloat16 (meant for
    GPUs; runs through Keras wherever the task lands). Part of the feature version."""
    extract_engine: str = "auto"
    """Variable `similarity_extract_engine`: auto (Keras on a GPU, ncnn's Winograd kernels on a
    CPU) | keras | ncnn. Engines agree within 1e-4, so this is not part of the feature version."""
    decode_workers: int = 0
    """Variable `similarity_decode_workers`: threads decoding images while the model runs (0 = one per core)."""

    # Orchestration. The DAG file reads these when it is parsed (see `dag_settings`), so a
    # change shows up at the next parse; the shard sizes are read by each run.
    schedule: str = "@daily"
    """Variable `similarity_schedule`: cron expression or preset (`@hourly`, `@daily`); `none` = manual only."""
    catchup: bool = False
    """Variable `similarity_catchup`: also create runs for intervals missed while the DAG was off."""
    download_shard_size: int = 2000
    """Variable `similarity_download_shard_size`: pending thumbnails per mapped download task."""
    extract_shard_size: int = 5000
    """Variable `similarity_extract_shard_size`: pending images per mapped extraction task."""
    max_shards: int = 16
    """Variable `similarity_max_shards`: upper bound on mapped tasks per stage."""
    gpu_pool: str = "gpu"
    """Variable `similarity_gpu_pool`: Airflow pool of extraction tasks (one slot per GPU)."""
    gpu_queue: str = "gpu"
    """Variable `similarity_gpu_queue`: executor queue served by GPU workers (Celery/Kubernetes)."""
    task_retries: int = 3
    """Variable `similarity_task_retries`: retries per task, with exponential backoff."""
    retry_delay_s: int = 60
    """Variable `similarity_retry_delay_s`: first retry delay; it doubles on each further retry."""
    max_retry_delay_s: int = 1800
    """Variable `similarity_max_retry_delay_s`: cap on the retry delay."""
    task_timeout_minutes: int = 360
    """Variable `similarity_task_timeout_minutes`: execution timeout of each task."""
    run_wait_poke_s: int = 30
    """Variable `similarity_run_wait_poke_s`: how often a run waiting for its turn checks again."""
    run_wait_timeout_hours: int = 24
    """Variable `similarity_run_wait_timeout_hours`: a run that waited this long for its turn fails."""
    hnsw_m: int = 16
    """HNSW graph degree of `model_embeddings_hnsw_idx` (pgvector default 16; higher: better recall, bigger index)."""
    hnsw_ef_construction: int = 64
    """HNSW build-time candidate list (pgvector default 64; higher: better graph, slower build)."""
    hnsw_ef_search: int = 100
    """Variable `similarity_hnsw_ef_search`: search-time candidate list of the index searches in
    `similar_models()` (fallback) and `similar_to_vector()` (pgvector default 40; must be >= k)."""
    hnsw_build_memory: str = "1GB"
    """`maintenance_work_mem` while (re)building the HNSW index; a graph that fits builds several times faster."""
    hnsw_rebuild_percent: int = 20
    """When a load adds or changes more than this share of the table (in percent), the HNSW index is
    dropped for the load and rebuilt afterwards (CONCURRENTLY): inserting into a live HNSW graph runs
    at a few hundred vectors/s, a bulk build about five times faster."""
    refresh_tile: int = 2048
    """Rows x columns per block of the exact top-N matrix products (about tile^2 x 4 bytes per block)."""
    refresh_engine: str = "auto"
    """Variable `similarity_refresh_engine`: where full rebuilds compute their products. auto (Keras
    on a GPU when the worker has one, numpy otherwise), numpy, or keras (Keras' backend, GPU or not).
    Incremental refreshes always use numpy: their work is small."""
    refresh_parts: int = 1
    """Parallel mapped `refresh_similarity` tasks that each compute a share of the top-N lists
    before one atomic publish. Part of the DAG's shape, so it is read when the DAG is parsed,
    from the environment variable AIRFLOW_VAR_SIMILARITY_REFRESH_PARTS."""

    # Evaluation (DAG sketchfab_similarity_evaluation, `python -m sketchfab_similarity.evaluation`).
    evaluation_sample_size: int = 2000
    """Variable `similarity_evaluation_sample_size`: query models drawn (seeded) for the metrics that
    cost more than a pass over the published table: precision@k, baselines, re-ranking."""
    evaluation_seed: int = 0
    """Variable `similarity_evaluation_seed`: seed of the evaluation sample and the random baseline."""
    evaluation_duplicate_cosine: float = 0.999
    """Cosine above which two models count as near-duplicates (identical or re-uploaded thumbnails)."""
    hubness_rerank: str = "none"
    """Variable `similarity_hubness_rerank`: `none` (default) or `csls`: the evaluation also computes
    CSLS re-ranked lists (2 cos(x, y) - r(x) - r(y), r = mean cosine to the csls_k nearest) for its
    sample and records their metrics beside the published lists'. Published lists are unchanged."""
    csls_k: int = 10
    """Variable `similarity_csls_k`: neighbourhood size k of the CSLS radius r (at most similarity_top_n)."""

    def __post_init__(self) -> None:
        if self.input_size < 32:
            raise ValueError(f"similarity_input_size must be >= 32 (VGG16's minimum), got {self.input_size}")
        if self.top_n < 1:
            raise ValueError(f"similarity_top_n must be >= 1, got {self.top_n}")
        if not self.thumbnail_hosts:
            raise ValueError("similarity_thumbnail_hosts must name at least one host")
        if self.extract_batch_size < 1 or self.gpu_batch_size < 1:
            raise ValueError("similarity_extract_batch_size and similarity_gpu_batch_size must be >= 1")
        if self.decode_workers < 0:
            raise ValueError(f"similarity_decode_workers must be >= 0, got {self.decode_workers}")
        for name in ("download_shard_size", "extract_shard_size", "max_shards", "run_wait_poke_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"similarity_{name} must be >= 1, got {getattr(self, name)}")
        for name in ("task_retries", "retry_delay_s", "max_retry_delay_s", "task_timeout_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"similarity_{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.page_size <= 24:
            raise ValueError(f"page_size must be between 1 and 24 (the API's maximum), got {self.page_size}")
        if self.download_workers < 1:
            raise ValueError(f"similarity_download_workers must be >= 1, got {self.download_workers}")
        if min(self.api_retries, self.download_retries, self.api_body_retries) < 0:
            raise ValueError("retry counts must be >= 0")
        if self.hnsw_ef_search < 1 or self.hnsw_m < 2 or self.hnsw_ef_construction < 2 * self.hnsw_m:
            raise ValueError(
                "HNSW parameters need ef_search >= 1, m >= 2 and ef_construction >= 2 * m, got "
                f"ef_search={self.hnsw_ef_search}, m={self.hnsw_m}, ef_construction={self.hnsw_ef_construction}"
            )
        if self.refresh_engine not in REFRESH_ENGINES:
            raise ValueError(
                f"similarity_refresh_engine must be one of {', '.join(REFRESH_ENGINES)}, got {self.refresh_engine!r}"
            )
        if self.refresh_parts < 1 or self.refresh_tile < 32:
            raise ValueError(
                f"similarity_refresh_parts must be >= 1 and refresh_tile >= 32, got {self.refresh_parts}, "
                f"{self.refresh_tile}"
            )

        if self.evaluation_sample_size < 2 or self.csls_k < 1:
            raise ValueError(
                f"similarity_evaluation_sample_size must be >= 2 and similarity_csls_k >= 1, got "
                f"{self.evaluation_sample_size}, {self.csls_k}"
            )
        if self.hubness_rerank not in HUBNESS_RERANKS:
            raise ValueError(
                f"similarity_hubness_rerank must be one of {', '.join(HUBNESS_RERANKS)}, got {self.hubness_rerank!r}"
            )
        if not 0.0 < self.evaluation_duplicate_cosine <= 1.0:
            raise ValueError(
                f"evaluation_duplicate_cosine must be in (0, 1], got {self.evaluation_duplicate_cosine}"
            )

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# Variable name -> Settings field. Values arrive as strings and are converted by field type.
VARIABLES: dict[str, str] = {
    "similarity_thumbnail_store": "thumbnail_store",
    "similarity_thumbnail_hosts": "thumbnail_hosts",
    "similarity_vgg16_weights": "vgg16_weights",
    "similarity_input_size": "input_size",
    "similarity_top_n": "top_n",
    "similarity_random_seed": "random_seed",
    "similarity_crawl_overlap_minutes": "crawl_overlap_minutes",
    "similarity_download_workers": "download_workers",
    "similarity_extract_batch_size": "extract_batch_size",
    "similarity_gpu_batch_size": "gpu_batch_size",
    "similarity_feature_layer": "feature_layer",
    "similarity_feature_pooling": "feature_pooling",
    "similarity_resize_mode": "resize_mode",
    "similarity_resize_interpolation": "resize_interpolation",
    "similarity_jpeg_decode": "jpeg_decode",
    "similarity_extract_precision": "extract_precision",
    "similarity_extract_engine": "extract_engine",
    "similarity_refresh_engine": "refresh_engine",
    "similarity_decode_workers": "decode_workers",
    "similarity_schedule": "schedule",
    "similarity_catchup": "catchup",
    "similarity_download_shard_size": "download_shard_size",
    "similarity_extract_shard_size": "extract_shard_size",
    "similarity_max_shards": "max_shards",
    "similarity_gpu_pool": "gpu_pool",
    "similarity_gpu_queue": "gpu_queue",
    "similarity_task_retries": "task_retries",
    "similarity_retry_delay_s": "retry_delay_s",
    "similarity_max_retry_delay_s": "max_retry_delay_s",
    "similarity_task_timeout_minutes": "task_timeout_minutes",
    "similarity_run_wait_poke_s": "run_wait_poke_s",
    "similarity_run_wait_timeout_hours": "run_wait_timeout_hours",
    "similarity_thumbnail_private_hosts": "thumbnail_private_hosts",
    "similarity_max_download_attempts": "max_download_attempts",
    "similarity_api_retries": "api_retries",
    "similarity_hnsw_ef_search": "hnsw_ef_search",
    "similarity_evaluation_sample_size": "evaluation_sample_size",
    "similarity_evaluation_seed": "evaluation_seed",
    "similarity_hubness_rerank": "hubness_rerank",
    "similarity_csls_k": "csls_k",
}

# libpq keywords that may arrive as connection extras (e.g. `?host=/run/postgresql`).
_LIBPQ_EXTRAS = {
    "host", "port", "sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout",
    "application_name", "options", "target_session_attrs", "keepalives", "keepalives_idle",
}  # fmt: skip


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_variable(name: str, raw: str) -> Any:
    """Convert a Variable's string value to the type of its Settings field, with a clear error."""
    field_name = VARIABLES[name]
    default = getattr(Settings(), field_name)
    raw = raw.strip()
    if isinstance(default, tuple):
        return tuple(h.strip().lower() for h in raw.split(",") if h.strip())
    if isinstance(default, bool):
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(f"Variable {name} must be true or false, got {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"Variable {name} must be an integer, got {raw!r}") from None
    return raw


def db_url_from_connection(conn: Any) -> str:
    """SQLAlchemy URL for an Airflow Postgres connection; Unix-socket hosts come as `?host=/path`."""
    extras = conn.extra_dejson or {}
    query = {k: str(v) for k, v in extras.items() if k in _LIBPQ_EXTRAS}
    url = URL.create(
        "postgresql+psycopg2",
        username=conn.login or None,
        password=conn.password or None,
        host=conn.host or None,
        port=conn.port or None,
        database=conn.schema or None,
        query=query,
    )
    return url.render_as_string(hide_password=False)


def api_base_url_from_connection(conn: Any) -> str:
    """Base URL from an HTTP connection: host may hold a full URL; schema may hold http/https."""
    host = (conn.host or "").rstrip("/")
    if not host:
        return DEFAULT_API_BASE_URL
    if "://" in host:
        return host
    scheme = next(
        (s for s in (conn.schema, conn.conn_type) if s in ("http", "https")),
        "https",
    )
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{host}{port}"


def variable_values() -> dict[str, Any]:
    """Settings fields given by Airflow Variables (or `AIRFLOW_VAR_*` environment variables)."""
    from airflow.sdk import Variable

    values: dict[str, Any] = {}
    for name, field_name in VARIABLES.items():
        raw = Variable.get(name, default=None)
        if raw is not None and str(raw).strip() != "":
            values[field_name] = parse_variable(name, str(raw))
    return values


def dag_settings() -> Settings:
    """Settings for the DAG file at parse time: Variables only, no connections (no database needed)."""
    return Settings(**variable_values())


def settings_from_airflow(**overrides: Any) -> Settings:
    """Build Settings from the contract's Airflow connections and Variables."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import BaseHook

    values = variable_values()

    try:
        db_conn = BaseHook.get_connection(DB_CONN_ID)
    except AirflowNotFoundException:
        raise RuntimeError(
            f"Airflow connection {DB_CONN_ID!r} is not defined: point it at a Postgres with pgvector, "
            f"e.g. AIRFLOW_CONN_SIMILARITY_DB='postgresql://user:pass@host:5432/db'"
        ) from None
    values["db_url"] = db_url_from_connection(db_conn)

    try:
        api_conn = BaseHook.get_connection(API_CONN_ID)
    except AirflowNotFoundException:
        api_conn = None
    if api_conn is not None:
        values["api_base_url"] = api_base_url_from_connection(api_conn)
        values["api_token"] = api_conn.password or None

    return Settings(**values).with_overrides(**overrides)


def describe(settings: Settings) -> dict[str, Any]:
    """Settings as a loggable dict, secrets masked."""
    out = {f.name: getattr(settings, f.name) for f in fields(settings)}
    out["api_token"] = "***" if settings.api_token else None
    if settings.db_url:
        parts = urlsplit(settings.db_url)
        if parts.password:
            out["db_url"] = settings.db_url.replace(f":{parts.password}@", ":***@")
    return out
