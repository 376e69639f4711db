"""All configuration in one place: every setting is a field here, and the field says what it is.

Each field's metadata (`SettingInfo`) gives its documentation, how it reaches a deployment
(an Airflow connection, a Variable read by each task, a Variable read when the DAG file is
parsed, an environment variable, or code only), and its validation. Everything else is
derived from it: the Variable names (`VARIABLES`), the reads at parse time and per task,
and the README's configuration table (`markdown_table`, checked by a test).

Stage modules take a `Settings` object and never read Airflow themselves, so they run and
test without Airflow. `settings_from_airflow()` builds one from the contract's connections
(`sketchfab_api`, `similarity_db`) and Variables (`similarity_*`, so `AIRFLOW_VAR_SIMILARITY_*`
environment variables work).

Why this module is long: one documented field per setting, on purpose; configuration lives in
one place and nowhere else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import URL

from .images import INTERPOLATIONS, JPEG_DECODES, RESIZE_MODES

API_CONN_ID = "sketchfab_api"
DB_CONN_ID = "similarity_db"
DEFAULT_API_BASE_URL = "https://api.sketchfab.com"
VARIABLE_PREFIX = "similarity_"
REFRESH_ENGINES = ("auto", "numpy", "keras")
HUBNESS_RERANKS = ("none", "csls")
EXTRACT_ENGINES = ("auto", "keras", "ncnn")
URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*(@)")
# VGG16 layers whose output has 512 channels, so the pooled vector fits the vector(512) column.
ALLOWED_LAYERS = ("block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
                  "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool")  # fmt: skip
POOLINGS = ("avg", "max")
STORAGE_GC_MODES = ("off", "dry-run", "delete")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

# How a setting reaches a deployment.
CONNECTION = "connection"
"""From an Airflow connection (`similarity_db`, `sketchfab_api`)."""
TASK = "task"
"""A Variable, read by each task: a change applies to the next task that starts."""
PARSE = "parse"
"""A Variable read when the DAG file is parsed (it shapes the DAG): a change applies from the next parse."""
ENV = "env"
"""An `AIRFLOW_VAR_*` environment variable only, read at parse time: it shapes the DAG's mapped
tasks, and a Variable lookup on every parse would query the metadata database."""
INTERNAL = "internal"
"""Code only (tests, benchmarks, tuning by a developer); not a Variable."""


@dataclass(frozen=True)
class SettingInfo:
    doc: str
    read: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    secret: bool = False

    def variable(self, name: str) -> str | None:
        return VARIABLE_PREFIX + name if self.read in (TASK, PARSE, ENV) else None


def setting(
    default: Any,
    doc: str,
    *,
    read: str,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A Settings field with its documentation, source and validation."""
    info = SettingInfo(" ".join(doc.split()), read, minimum, maximum, choices, secret)
    if factory is not None:
        return field(default_factory=factory, repr=not secret, metadata={"setting": info})
    return field(default=default, repr=not secret, metadata={"setting": info})


def default_thumbnail_store() -> str:
    """Next to Airflow's own files, so a fresh install works without configuration."""
    airflow_home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
    return str(Path(airflow_home) / "similarity_thumbnails")


def check_value(name: str, value: Any) -> None:
    """Validate one field's value against its metadata; the error names the Variable a user sets."""
    info: SettingInfo = Settings.__dataclass_fields__[name].metadata["setting"]
    label = f"Variable {info.variable(name)}" if info.variable(name) else name
    if info.choices is not None and value not in info.choices:
        raise ValueError(f"{label} must be one of {', '.join(info.choices)}; got {value!r}")
    if info.minimum is not None and value < info.minimum:
        raise ValueError(f"{label} must be >= {info.minimum:g}, got {value}")
    if info.maximum is not None and value > info.maximum:
        raise ValueError(f"{label} must be <= {info.maximum:g}, got {value}")


@dataclass(frozen=True)
class Settings:
    """Pipeline configuration. Field metadata is the reference for Variables and the README's table."""

    db_url: str = setting(
        "",
        "SQLAlchemy URL of the Postgres-with-pgvector database (from the `similarity_db` connection).",
        read=CONNECTION,
        secret=True,
    )
    api_base_url: str = setting(
        DEFAULT_API_BASE_URL,
        "Sketchfab API base URL (from the `sketchfab_api` connection's schema/host/port).",
        read=CONNECTION,
    )
    api_token: str | None = setting(
        None,
        "Sketchfab API token (the `sketchfab_api` connection's password); optional.",
        read=CONNECTION,
        secret=True,
    )
    thumbnail_store: str = setting(
        None,
        "Local path or fsspec URL (file://, s3://, ...). An object store URL may name an Airflow "
        "connection as ObjectStoragePath does: `s3://conn_id@bucket/path`.",
        read=TASK,
        factory=default_thumbnail_store,
    )
    thumbnail_store_options: dict[str, Any] = setting(
        None,
        "fsspec options of the store (credentials, endpoint), built from the connection its URL names.",
        read=CONNECTION,
        secret=True,
        factory=dict,
    )
    thumbnail_hosts: tuple[str, ...] = setting(
        ("media.sketchfab.com",),
        "The only hosts thumbnails may be fetched from.",
        read=TASK,
    )
    vgg16_weights: str = setting(
        "imagenet",
        "`imagenet` (Keras' loader and cache), a weights file path (`.weights.h5` or Keras' legacy no-top `.h5`), or `random` (explicit, seeded; tests and offline demos).",
        read=TASK,
    )
    input_size: int = setting(
        224,
        "VGG16 input side in pixels (>= 32).",
        read=TASK,
        minimum=32,
    )
    top_n: int = setting(
        20,
        "Rows kept per model in `model_similarity`.",
        read=TASK,
        minimum=1,
    )
    random_seed: int = setting(
        0,
        "Seed used when weights are `random`.",
        read=TASK,
        minimum=0,
    )
    crawl_overlap_minutes: int = setting(
        60,
        "Re-read window below the watermark.",
        read=TASK,
        minimum=0,
    )
    page_size: int = setting(
        24,
        "Models per API page (24 is the API's maximum).",
        read=INTERNAL,
        minimum=1,
        maximum=24,
    )
    api_listing_cap: int = setting(
        10_000,
        "How many results one listing query yields at most before the API stops paging it. Listings "
        "that reach it are split into slices (face-count ranges, then boolean facets) that each end "
        "before it; tests set it low to exercise slicing.",
        read=TASK,
        minimum=48,
    )
    crawl_slice_fill_percent: int = setting(
        50,
        "New slices are sized to about this share of the cap (from the models already stored), so "
        "that estimation errors rarely make one reach the cap, which costs a re-crawl of it as smaller "
        "slices.",
        read=INTERNAL,
        minimum=1,
        maximum=100,
    )
    crawl_recrawl_percent: int = setting(
        10,
        "Share of the slice map that each incremental run pages again to its end (least recently "
        "crawled first), so deleted models and changed thumbnails are noticed within about "
        "100/percent runs; 0 turns it off. The Param `full_recrawl` does all.",
        read=TASK,
        minimum=0,
        maximum=100,
    )
    download_workers: int = setting(
        32,
        "Thumbnail requests in flight at once (per task). At 20 ms per request, 16 cap a task near 750 "
        "thumbnails/s; 32 leave the CPU as the limit.",
        read=TASK,
        minimum=1,
    )
    http_timeout_s: float = setting(
        20.0,
        "Connect/read timeout for every HTTP request.",
        read=INTERNAL,
    )
    max_image_bytes: int = setting(
        10_000_000,
        "Thumbnails larger than this are refused while streaming.",
        read=INTERNAL,
    )
    max_image_pixels: int = setting(
        16_777_216,
        "Thumbnails with more pixels than this (4096x4096; Sketchfab's largest is 1920x1080) are "
        "refused from the header, before decoding (decompression bombs).",
        read=INTERNAL,
        minimum=1,
    )
    max_image_decode_bytes: int = setting(
        128 * 2**20,
        "Memory one image may take to decode and convert to RGB, estimated from its header (mode and "
        "size: RGBA and 16-bit images cost several times an RGB JPEG of the same size); larger ones "
        "are refused before decoding. Times the decode threads, this bounds the stages' image memory.",
        read=INTERNAL,
        minimum=1,
    )
    max_download_attempts: int = setting(
        3,
        "A thumbnail that failed for a transient reason is retried on later runs up to this many times.",
        read=TASK,
        minimum=1,
    )
    api_retries: int = setting(
        6,
        "Retries of one API request on connection errors, 429 and 5xx before the crawl task fails "
        "(Airflow's task retry then resumes from the checkpoint).",
        read=TASK,
        minimum=0,
    )
    api_backoff_s: float = setting(
        0.5,
        "Base of the exponential backoff between API retries (doubling, plus up to as much random jitter).",
        read=INTERNAL,
    )
    api_retry_after_cap_s: float = setting(
        120.0,
        "Longest sleep honoured for one `Retry-After` (a misbehaving proxy may ask for hours).",
        read=INTERNAL,
    )
    api_body_retries: int = setting(
        2,
        "Retries of a 200 response that is not JSON (a proxy's error page) before it is an error.",
        read=INTERNAL,
        minimum=0,
    )
    api_pace_below: int = setting(
        3,
        "When `X-RateLimit-Remaining` drops below this, spread the rest of the window until its reset.",
        read=INTERNAL,
    )
    api_max_pace_sleep_s: float = setting(
        60.0,
        "Longest pause taken for pacing on rate-limit headers.",
        read=INTERNAL,
    )
    download_retries: int = setting(
        2,
        "Retries of one thumbnail request on connection errors, 429 and 5xx within a run.",
        read=INTERNAL,
        minimum=0,
    )
    download_backoff_s: float = setting(
        0.2,
        "Base of the exponential backoff between thumbnail retries.",
        read=INTERNAL,
    )
    download_retry_after_cap_s: float = setting(
        10.0,
        "Longest `Retry-After` a download worker waits; beyond it the row fails as transient for a later "
        "run.",
        read=INTERNAL,
    )
    download_deadline_s: float = setting(
        60.0,
        "Whole-download time limit for one thumbnail (a server trickling bytes cannot hold a worker).",
        read=INTERNAL,
    )
    thumbnail_private_hosts: tuple[str, ...] = setting(
        ("localhost", "127.0.0.1", "::1"),
        "Allow-listed hosts that may resolve to private, loopback or link-local addresses (local mirrors, "
        "the demo). Any other host doing so is refused.",
        read=TASK,
    )
    extract_batch_size: int = setting(
        32,
        "Images per forward pass on the CPU.",
        read=TASK,
        minimum=1,
    )
    gpu_batch_size: int = setting(
        256,
        "Images per forward pass when a GPU is used.",
        read=TASK,
        minimum=1,
    )
    feature_layer: str = setting(
        "block5_pool",
        "VGG16 layer whose output is pooled (any 512-channel layer, block4_conv1 .. block5_pool). Part of "
        "the feature version.",
        read=TASK,
        choices=ALLOWED_LAYERS,
    )
    feature_pooling: str = setting(
        "avg",
        "Global `avg` or `max` pooling. Part of the feature version.",
        read=TASK,
        choices=POOLINGS,
    )
    resize_mode: str = setting(
        "squash",
        "`squash` (whole frame to a square, as the original post) or `center_crop` (keeps aspect). Part "
        "of the feature version.",
        read=TASK,
        choices=RESIZE_MODES,
    )
    resize_interpolation: str = setting(
        "bilinear",
        "`nearest`, `bilinear`, `bicubic`, `hamming`, `box` or `lanczos`, as keras.utils.load_img names them (its default is nearest). Part of the feature version.",
        read=TASK,
        choices=tuple(INTERPOLATIONS),
    )
    jpeg_decode: str = setting(
        "reduced",
        "`reduced` decodes JPEGs at 1/2..1/8 scale when still >= the input size (fast); `full` decodes "
        "every pixel. Part of the feature version.",
        read=TASK,
        choices=JPEG_DECODES,
    )
    extract_precision: str = setting(
        "float32",
        "`float32`, `mixed_float16` or `mixed_bfloat16` (meant for GPUs; runs through Keras wherever the task lands). Part of the feature version.",
        read=TASK,
        choices=PRECISIONS,
    )
    extract_engine: str = setting(
        "auto",
        "`auto` (Keras on a GPU, ncnn's Winograd kernels on a CPU), `keras` or `ncnn`. Engines agree within 1e-4, so this is not part of the feature version.",
        read=TASK,
        choices=EXTRACT_ENGINES,
    )
    decode_workers: int = setting(
        0,
        "Threads decoding images while the model runs (0 = one per core).",
        read=TASK,
        minimum=0,
    )
    schedule: str = setting(
        "@daily",
        "Cron expression or preset (`@hourly`, `@daily`); `none` = manual only.",
        read=PARSE,
    )
    catchup: bool = setting(
        False,
        "Also create runs for intervals missed while the DAG was off.",
        read=PARSE,
    )
    download_shard_size: int = setting(
        2000,
        "Pending thumbnails per mapped download task.",
        read=TASK,
        minimum=1,
    )
    extract_shard_size: int = setting(
        5000,
        "Pending images per mapped extraction task.",
        read=TASK,
        minimum=1,
    )
    max_shards: int = setting(
        16,
        "Upper bound on mapped tasks per stage.",
        read=TASK,
        minimum=1,
    )
    gpu_pool: str = setting(
        "gpu",
        "Airflow pool of extraction tasks (one slot per GPU).",
        read=PARSE,
    )
    gpu_queue: str = setting(
        "gpu",
        "Executor queue served by GPU workers (Celery/Kubernetes).",
        read=PARSE,
    )
    task_retries: int = setting(
        3,
        "Retries per task, with exponential backoff.",
        read=PARSE,
        minimum=0,
    )
    retry_delay_s: int = setting(
        60,
        "First retry delay; it doubles on each further retry.",
        read=PARSE,
        minimum=0,
    )
    max_retry_delay_s: int = setting(
        1800,
        "Cap on the retry delay.",
        read=PARSE,
        minimum=0,
    )
    task_timeout_minutes: int = setting(
        360,
        "Execution timeout of each task.",
        read=PARSE,
        minimum=0,
    )
    run_wait_poke_s: int = setting(
        30,
        "How often a run waiting for its turn checks again.",
        read=PARSE,
        minimum=1,
    )
    run_wait_timeout_hours: int = setting(
        24,
        "A run that waited this long for its turn fails.",
        read=PARSE,
        minimum=0,
    )
    hnsw_m: int = setting(
        16,
        "HNSW graph degree of `model_embeddings_hnsw_idx` (pgvector default 16; higher: better recall, "
        "bigger index).",
        read=INTERNAL,
        minimum=2,
    )
    hnsw_ef_construction: int = setting(
        64,
        "HNSW build-time candidate list (pgvector default 64; higher: better graph, slower build).",
        read=INTERNAL,
    )
    hnsw_ef_search: int = setting(
        100,
        "Search-time candidate list of the index searches in `similar_models()` (fallback) and "
        "`similar_to_vector()` (pgvector default 40; must be >= k).",
        read=TASK,
        minimum=1,
    )
    hnsw_build_memory: str = setting(
        "1GB",
        "`maintenance_work_mem` while (re)building the HNSW index; a graph that fits builds several times "
        "faster.",
        read=INTERNAL,
    )
    hnsw_rebuild_percent: int = setting(
        20,
        "When a load adds or changes more than this share of the table (in percent), the HNSW index is "
        "dropped for the load and rebuilt afterwards (CONCURRENTLY): inserting into a live HNSW graph "
        "runs at a few hundred vectors/s, a bulk build about five times faster.",
        read=INTERNAL,
    )
    refresh_tile: int = setting(
        2048,
        "Rows x columns per block of the exact top-N matrix products (about tile^2 x 4 bytes per block).",
        read=INTERNAL,
        minimum=32,
    )
    refresh_engine: str = setting(
        "auto",
        "Where full rebuilds compute their products. auto (Keras on a GPU when the worker has one, numpy "
        "otherwise), numpy, or keras (Keras' backend, GPU or not). Incremental refreshes always use "
        "numpy: their work is small.",
        read=TASK,
        choices=REFRESH_ENGINES,
    )
    refresh_parts: int = setting(
        1,
        "Parallel mapped `refresh_similarity` tasks that each compute a share of the top-N lists before "
        "one atomic publish. Part of the DAG's shape, so it is read when the DAG is parsed, from the "
        "environment variable AIRFLOW_VAR_SIMILARITY_REFRESH_PARTS.",
        read=ENV,
        minimum=1,
    )

    migration_lock_timeout_s: float = setting(
        5.0,
        "How long a new schema migration waits for a table lock before giving up (the task is "
        "retried), so readers never queue behind it for longer.",
        read=TASK,
        minimum=0.001,
    )
    gallery_statement_timeout_s: float = setting(
        5.0,
        "The gallery's queries are cancelled after this; a page shows an error instead of holding a "
        "database connection.",
        read=TASK,
        minimum=0.001,
    )
    gallery_db_role: str = setting(
        "similarity_gallery_reader",
        "The read-only role the gallery's connections switch to (created by sql/102 when the "
        "pipeline's user may create roles); empty: the pipeline's own role.",
        read=TASK,
    )
    failure_max_share: float = setting(
        0.5,
        "A stage whose failed items exceed this share of its items (rejected records, failed "
        "downloads, failed extractions, rejected vectors) fails the run, once it had at least "
        "`failure_min_items` items; a few bad thumbnails keep the run green.",
        read=TASK,
        minimum=0.0,
        maximum=1.0,
    )
    failure_min_items: int = setting(
        20,
        "Below this many items a stage fails the run only when every one of its items failed (a "
        "small run with one bad record is not a failed run).",
        read=TASK,
        minimum=1,
    )
    storage_gc: str = setting(
        "off",
        "The `collect_garbage` task at the end of each run: `off`, `dry-run` (logs what it would "
        "remove) or `delete`: thumbnails no row references, `.tmp` files of crashed writes, feature "
        "files of failed loads. It lists the whole store, so its cost grows with the store, not the run.",
        read=TASK,
        choices=STORAGE_GC_MODES,
    )
    storage_gc_min_age_hours: float = setting(
        24.0,
        "`collect_garbage` leaves files younger than this alone (a download or extraction in flight).",
        read=TASK,
        minimum=1.0,
    )
    # Evaluation (DAG sketchfab_similarity_evaluation, `python -m sketchfab_similarity.evaluation`).
    evaluation_sample_size: int = setting(
        2000,
        "Query models drawn (seeded) for the evaluation's metrics that cost more than a pass over the "
        "published table: precision@k and tags Jaccard, the baselines, CSLS re-ranking.",
        read=TASK,
        minimum=2,
    )
    evaluation_seed: int = setting(
        0, "Seed of the evaluation sample and of the random baseline.", read=TASK, minimum=0
    )
    evaluation_duplicate_cosine: float = setting(
        0.999,
        "Cosine above which two models count as near-duplicates (identical or re-uploaded thumbnails).",
        read=INTERNAL,
        minimum=0.0,
        maximum=1.0,
    )
    hubness_rerank: str = setting(
        "none",
        "`csls`: the evaluation also measures CSLS re-ranked lists (2 cos(x, y) - r(x) - r(y), r = mean "
        "cosine to the similarity_csls_k nearest) beside the published ones; the published lists are "
        "unchanged. `none`: off.",
        read=TASK,
        choices=HUBNESS_RERANKS,
    )
    csls_k: int = setting(10, "Neighbourhood size of the CSLS radius r.", read=TASK, minimum=1)

    def __post_init__(self) -> None:
        for f in fields(self):
            check_value(f.name, getattr(self, f.name))
        if not self.thumbnail_hosts:
            raise ValueError("similarity_thumbnail_hosts must name at least one host")
        if self.api_listing_cap < 2 * self.page_size:
            raise ValueError(
                f"Variable similarity_api_listing_cap must be >= {2 * self.page_size}, got {self.api_listing_cap}"
            )
        if self.hnsw_ef_construction < 2 * self.hnsw_m:
            raise ValueError(
                "HNSW parameters need ef_construction >= 2 * m, got "
                f"m={self.hnsw_m}, ef_construction={self.hnsw_ef_construction}"
            )

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


SETTINGS_INFO: dict[str, SettingInfo] = {f.name: f.metadata["setting"] for f in fields(Settings)}
VARIABLES: dict[str, str] = {
    variable: name for name, info in SETTINGS_INFO.items() if (variable := info.variable(name))
}
"""Variable name -> Settings field. Values arrive as strings and are converted by field type."""


def variables_read(*reads: str) -> dict[str, str]:
    """The Variables of the given kinds (TASK, PARSE, ENV): name -> field."""
    return {var: name for var, name in VARIABLES.items() if SETTINGS_INFO[name].read in reads}


def default_value(name: str) -> Any:
    f = Settings.__dataclass_fields__[name]
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def markdown_table() -> str:
    """The README's Variables table, generated from the fields (`make docs`; a test keeps them equal)."""
    rows = ["| Variable | read | default | meaning |", "|---|---|---|---|"]
    for var, name in VARIABLES.items():
        info = SETTINGS_INFO[name]
        default = default_value(name)
        if name == "thumbnail_store":
            shown = "`$AIRFLOW_HOME/similarity_thumbnails`"
        elif isinstance(default, tuple):
            shown = f"`{','.join(default)}`"
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        else:
            shown = f"`{default}`"
        rows.append(f"| `{var}` | {info.read} | {shown} | {info.doc.replace('|', '/')} |")
    return "\n".join(rows)


# Extras PostgresHook.get_conn() keeps to itself; every other extra is a libpq keyword, passed as is.
_HOOK_ONLY_EXTRAS = frozenset(
    {"iam", "redshift", "redshift-serverless", "cursor", "cluster-identifier", "workgroup-name",
     "aws_conn_id", "sqlalchemy_scheme", "sqlalchemy_query", "azure_conn_id", "enable_log_db_messages"}
)  # fmt: skip


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_variable(name: str, raw: str) -> Any:
    """Convert a Variable's string value to the type of its Settings field, with a clear error."""
    default = default_value(VARIABLES[name])
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
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"Variable {name} must be a number, got {raw!r}") from None
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


def variable_values(*reads: str) -> dict[str, Any]:
    """Settings fields given by Airflow Variables of these kinds (or `AIRFLOW_VAR_*` environment variables)."""
    from airflow.sdk import Variable

    values: dict[str, Any] = {}
    for name, field_name in variables_read(*reads).items():
        raw = Variable.get(name, default=None)
        if raw is not None and str(raw).strip() != "":
            values[field_name] = parse_variable(name, str(raw))
    return values


def environment_values(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """ENV settings, from `AIRFLOW_VAR_<NAME>` environment variables only (no metadata database)."""
    values: dict[str, Any] = {}
    for name, field_name in variables_read(ENV).items():
        raw = environ.get(f"AIRFLOW_VAR_{name.upper()}", "")
        if raw.strip():
            values[field_name] = parse_variable(name, raw)
    return values


def dag_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """Settings for the DAG file at parse time: the PARSE Variables and ENV variables only, so a
    parse makes no more Variable lookups than the DAG's shape needs (and needs no connection)."""
    return Settings(**variable_values(PARSE), **environment_values(environ))


def settings_from_airflow(**overrides: Any) -> Settings:
    """Build Settings from the contract's Airflow connections and Variables."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import BaseHook

    values = {**variable_values(TASK, PARSE), **environment_values()}

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
