"""Stage 2, download_thumbnails: `plan` says what to fetch, `download` fetches, stores and records;
`fetch` is the guarded HTTP GET; `gc` lists what the store holds that nothing references."""

from .download import DownloadStats, download_thumbnails
from .plan import DownloadTask, choose_thumbnail, pending_downloads

__all__ = ["DownloadStats", "DownloadTask", "choose_thumbnail", "download_thumbnails", "pending_downloads"]
