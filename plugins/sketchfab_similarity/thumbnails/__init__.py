"""Stage 2, download_thumbnails: `download` plans, runs and records; `fetch` is the guarded HTTP GET."""

from .download import DownloadStats, DownloadTask, choose_thumbnail, download_thumbnails, pending_downloads

__all__ = ["DownloadStats", "DownloadTask", "choose_thumbnail", "download_thumbnails", "pending_downloads"]
