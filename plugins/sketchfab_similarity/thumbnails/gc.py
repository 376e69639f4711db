"""Storage garbage collection: files in the artifact store that nothing needs any more.

Three kinds, each only once older than `min_age` (so a download or an extraction in flight,
whose row or load is still to come, is never touched):
- thumbnails no `model_thumbnails.stored_path` references (a model's image changed, a row was
  deleted), which content addressing otherwise keeps forever;
- `.tmp` files left by a writer that crashed before its rename;
- feature files left by a load that failed (a successful load task removes its own files).
Other files are never touched. A dry run (the default) lists what would go.

    python -m sketchfab_similarity.thumbnails.gc --db-url URL --store PATH [--min-age-hours 24] [--delete]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..core.cli import command_parser, parse
from ..core.db import connect
from ..core.settings import Settings
from ..core.store import FEATURE_KEY, THUMBNAIL_KEY, ArtifactStore, StoredFile

log = logging.getLogger(__name__)

DEFAULT_MIN_AGE_S = 24 * 3600


@dataclass
class GarbageReport:
    orphan_thumbnails: list[str] = field(default_factory=list)
    temporary_files: list[str] = field(default_factory=list)
    feature_files: list[str] = field(default_factory=list)
    bytes: int = 0
    removed: int = 0
    dry_run: bool = True

    @property
    def keys(self) -> list[str]:
        return [*self.orphan_thumbnails, *self.temporary_files, *self.feature_files]

    def listing(self) -> list[str]:
        """One line per file: what was (or, in a dry run, would be) removed."""
        verb = "would remove" if self.dry_run else "removed"
        kinds = (("orphan thumbnail", self.orphan_thumbnails), ("temporary file", self.temporary_files),
                 ("feature file", self.feature_files))  # fmt: skip
        return [f"{verb} {kind}: {key}" for kind, keys in kinds for key in keys]

    def counts(self) -> dict[str, int | bool]:
        return {"dry_run": self.dry_run, "orphan_thumbnails": len(self.orphan_thumbnails),
                "temporary_files": len(self.temporary_files), "feature_files": len(self.feature_files),
                "bytes": self.bytes, "removed": self.removed}  # fmt: skip


def referenced_paths(db_url: str) -> set[str]:
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT DISTINCT stored_path FROM model_thumbnails WHERE stored_path IS NOT NULL")
        return {row[0] for row in cur.fetchall()}


def find_garbage(
    settings: Settings, min_age_s: float = DEFAULT_MIN_AGE_S, now: float | None = None
) -> GarbageReport:
    """What collect_garbage would remove; reads the referenced paths after listing the store, so a
    thumbnail recorded meanwhile is seen as referenced."""
    store = ArtifactStore(settings.thumbnail_store)
    cutoff = (time.time() if now is None else now) - min_age_s
    old: list[StoredFile] = [f for f in store.files() if f.mtime is not None and f.mtime < cutoff]
    referenced = referenced_paths(settings.db_url)
    report = GarbageReport()
    for f in old:
        if f.key.endswith(".tmp"):
            report.temporary_files.append(f.key)
        elif THUMBNAIL_KEY.fullmatch(f.key) and f.key not in referenced:
            report.orphan_thumbnails.append(f.key)
        elif FEATURE_KEY.fullmatch(f.key):
            report.feature_files.append(f.key)
        else:
            continue
        report.bytes += f.size
    return report


def collect_garbage(
    settings: Settings,
    *,
    dry_run: bool = True,
    min_age_s: float = DEFAULT_MIN_AGE_S,
    now: float | None = None,
) -> GarbageReport:
    """Find the garbage and, unless `dry_run`, delete it."""
    report = find_garbage(settings, min_age_s, now)
    report.dry_run = dry_run
    if not dry_run:
        store = ArtifactStore(settings.thumbnail_store)
        for key in report.keys:
            store.delete(key)
            report.removed += 1
    log.info(
        "%s %d orphan thumbnails, %d temporary files, %d feature files (%d bytes)",
        "would remove" if dry_run else "removed",
        len(report.orphan_thumbnails), len(report.temporary_files), len(report.feature_files), report.bytes,
    )  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m sketchfab_similarity.thumbnails.gc", __doc__)
    parser.add_argument("--min-age-hours", type=float, default=DEFAULT_MIN_AGE_S / 3600)
    parser.add_argument("--delete", action="store_true", help="remove the files (default: list them only)")
    args = parse(parser, argv)
    settings = Settings(db_url=args.db_url, thumbnail_store=args.thumbnail_store)
    report = collect_garbage(settings, dry_run=not args.delete, min_age_s=args.min_age_hours * 3600)
    for line in report.listing():
        print(line)
    print(
        f"{len(report.keys)} files, {report.bytes} bytes" + (" (dry run)" if report.dry_run else " removed")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
