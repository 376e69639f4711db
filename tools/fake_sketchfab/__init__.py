"""A local, Sketchfab-compatible API server over a deterministic synthetic catalog.

Tests and the demo crawl it instead of api.sketchfab.com: same envelope, opaque
cursors, a separate media host for thumbnails, and switchable faults (see
``FaultConfig``) for everything a real crawl meets.
"""

from .catalog import (
    SHAPE_CLASSES,
    THUMBNAIL_SIZES,
    BadRecord,
    Catalog,
    FaultConfig,
    Model,
    Thumbnail,
    ThumbnailFault,
    User,
)
from .render import object_mask, render_thumbnail
from .server import RunningServer, Stats, start_server

__all__ = [
    "SHAPE_CLASSES",
    "THUMBNAIL_SIZES",
    "BadRecord",
    "Catalog",
    "FaultConfig",
    "Model",
    "RunningServer",
    "Stats",
    "Thumbnail",
    "ThumbnailFault",
    "User",
    "object_mask",
    "render_thumbnail",
    "start_server",
]
