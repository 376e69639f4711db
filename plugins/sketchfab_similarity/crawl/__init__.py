"""Stage 1, crawl_models: Sketchfab listings into `sketchfab_models`.

`crawler` pages the API and keeps the checkpoint and watermark, `records` turns API
records into rows (or rejects with a reason), `sketchfab` is the HTTP client. Past the
API's listing cap, `sliced` goes on through slices (`slices`: what a slice is and how new
ones are sized; `slicemap`: the slice map and each crawl's passes in Postgres), re-crawls
a share of them, and `deletions` marks models the API no longer serves as deleted.
"""

from .crawler import (
    NO_FILTERS,
    Checkpoint,
    CrawlFilters,
    CrawlStats,
    CrawlWindow,
    classify_page,
    crawl,
    default_run_key,
    incremental_window,
    read_watermark,
    watermark_name,
)
from .records import RejectedRecord, validate_model

__all__ = [
    "NO_FILTERS", "Checkpoint", "CrawlFilters", "CrawlStats", "CrawlWindow", "RejectedRecord",
    "classify_page", "crawl", "default_run_key", "incremental_window", "read_watermark",
    "validate_model", "watermark_name",
]  # fmt: skip
