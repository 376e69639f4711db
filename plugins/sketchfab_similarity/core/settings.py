"""All configuration in one place, with documented defaults.

Stage modules take a `Settings` object and never read Airflow themselves, so they
run and test without Airflow. `settings_from_airflow()` builds one from the
contract's connections (`sketchfab_api`, `similarity_db`) and Variables
(`similarity_*`, so `AIRFLOW_VAR_SIMILARITY_*` environment variables work).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import URL

API_CONN_ID = "sketchfab_api"
DB_CONN_ID = "similarity_db"
DEFAULT_API_BASE_URL = "https://api.sketchfab.com"
REFRESH_ENGINES = ("auto", "numpy", "keras")
URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*(@)")


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
    """Variable `similarity_thumbnail_store`: local path or fsspec URL (file://, s3://, ...). An object
    store URL may name an Airflow connection as ObjectStoragePath does: `s3://conn_id@bucket/path`."""
    thumbnail_store_options: dict[str, Any] = field(default_factory=dict, repr=False)
    """fsspec options of the store (credentials, endpoint), built from that connection."""
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
}

# Extras PostgresHook.get_conn() keeps to itself; every other extra is a libpq keyword, passed as is.
_HOOK_ONLY_EXTRAS = frozenset(
    {"iam", "redshift", "redshift-serverless", "cursor", "cluster-identifier", "workgroup-name",
     "aws_conn_id", "sqlalchemy_scheme", "sqlalchemy_query", "azure_conn_id", "enable_log_db_messages"}
)  # fmt: skip


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


def db_connect_args(conn: Any) -> dict[str, str]:
    """libpq keywords of a Postgres connection, exactly as `PostgresHook.get_conn()` builds them.

    Host, login, password, schema and port, then every extra except the hook's own (`iam`,
    `cursor`, ...) on top: so a socket directory in the host field (`/run/postgresql`), an
    `options` extra or `sslmode` reach libpq unchanged.
    """
    args = {"host": conn.host, "user": conn.login, "password": conn.password, "dbname": conn.schema}
    args["port"] = conn.port
    for key, value in (conn.extra_dejson or {}).items():
        if key not in _HOOK_ONLY_EXTRAS:
            args[key] = value
    return {k: str(v) for k, v in args.items() if v is not None and v != ""}


def db_url_from_connection(conn: Any) -> str:
    """SQLAlchemy URL that hands psycopg2 the same keywords as `db_connect_args`.

    Host and port travel in the query (`?host=/run/postgresql&port=5432`): SQLAlchemy passes
    query keys to psycopg2 unchanged, while a socket path in the URL's host part would be
    parsed as the database name."""
    args = db_connect_args(conn)
    user, password, dbname = args.pop("user", None), args.pop("password", None), args.pop("dbname", None)
    url = URL.create("postgresql+psycopg2", username=user, password=password, database=dbname, query=args)
    return url.render_as_string(hide_password=False)


def split_store_conn_id(url: str) -> tuple[str, str | None]:
    """`s3://conn_id@bucket/path` (ObjectStoragePath's convention) -> (`s3://bucket/path`, `conn_id`)."""
    parts = urlsplit(url)
    if "://" not in url or parts.scheme in ("", "file", "local") or "@" not in parts.netloc:
        return url, None
    conn_id, _, bucket = parts.netloc.rpartition("@")
    return parts._replace(netloc=bucket).geturl(), conn_id or None


def store_options_from_connection(conn: Any) -> dict[str, Any]:
    """fsspec options from an Airflow connection, as Airflow's object storage builds them.

    `aws` connections: login/password are the access key pair, extras `endpoint_url`
    (or `service_config.s3.endpoint_url`), `region_name`, `aws_session_token` and
    `config_kwargs` as the Amazon provider reads them. Other types: the extra
    `storage_options` is passed to fsspec as is.
    """
    extra = dict(conn.extra_dejson or {})
    if conn.conn_type not in ("aws", "s3"):
        return dict(extra.get("storage_options") or {})
    options: dict[str, Any] = {}
    if conn.login:
        options["key"] = conn.login
    if conn.password:
        options["secret"] = conn.password
    if extra.get("aws_session_token"):
        options["token"] = extra["aws_session_token"]
    endpoint = extra.get("endpoint_url") or extra.get("service_config", {}).get("s3", {}).get("endpoint_url")
    client = {k: v for k, v in (("endpoint_url", endpoint), ("region_name", extra.get("region_name"))) if v}
    if client:
        options["client_kwargs"] = client
    if extra.get("config_kwargs"):
        options["config_kwargs"] = dict(extra["config_kwargs"])
    return options


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
    if (db_conn.extra_dejson or {}).get("iam"):  # short-lived token, as PostgresHook gets it
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        db_conn.login, db_conn.password, db_conn.port = PostgresHook(
            postgres_conn_id=DB_CONN_ID
        ).get_iam_token(db_conn)
    values["db_url"] = db_url_from_connection(db_conn)

    store, store_conn_id = split_store_conn_id(values.get("thumbnail_store", ""))
    if store_conn_id:
        values["thumbnail_store"] = store
        values["thumbnail_store_options"] = store_options_from_connection(
            BaseHook.get_connection(store_conn_id)
        )

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
        out["db_url"] = URL_PASSWORD.sub(r"\1***\2", settings.db_url)
    out["thumbnail_store_options"] = {
        k: "***" if k in ("secret", "token", "key") else v
        for k, v in settings.thumbnail_store_options.items()
    }
    return out
