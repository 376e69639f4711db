"""What download_thumbnails fetches: the models listed in `thumbnails_due` that need a thumbnail.

The list (sql/107) is kept by triggers: a model is listed when it is new, when its thumbnail
list changes, when it comes back after a deletion and when its thumbnail row is removed. A plan
reads only listed models, so its cost is what changed, not the catalogue; it takes a model off
the list once it needs nothing. Which image, and whether a failure is worth retrying, depend on
two settings: when they change, every model is listed again.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..core.db import connect, set_state_value, state_value
from ..core.settings import Settings
from ..core.sharding import WHOLE, Shard
from .fetch import TRANSIENT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadTask:
    uid: str
    url: str | None


@dataclass
class DownloadPlan:
    tasks: list[DownloadTask] = field(default_factory=list)
    skipped_by_reason: Counter[str] = field(default_factory=Counter)

    @property
    def looked_at(self) -> int:
        """Listed models the plan judged: sent to download or skipped (gone ones not counted)."""
        return len(self.tasks) + self.skipped_by_reason.total()


def choose_thumbnail(images: list[dict[str, Any]], min_side: int) -> str | None:
    """The smallest image with both sides >= min_side; the largest one if none is big enough."""
    if not images:
        return None
    big_enough = [i for i in images if i["width"] >= min_side and i["height"] >= min_side]
    if big_enough:
        return min(big_enough, key=lambda i: (i["width"] * i["height"], i["url"]))["url"]
    return max(images, key=lambda i: (i["width"] * i["height"], i["url"]))["url"]


PLAN_STATE_KEY = "download_plan"
"""pipeline_state row: the settings the models left out of `thumbnails_due` were judged under.
What a model needs depends on them, so when they change every model is listed again."""


def plan_query(shard: Shard) -> str:
    """The models of this shard listed in `thumbnails_due` (sql/107), with their recorded download,
    newest first: the cost is the listed models, not the catalogue. `live` is false for a listed
    model that is gone or marked deleted."""
    return f"""
        SELECT d.uid, m.deleted_at IS NULL AND m.uid IS NOT NULL AS live, m.thumbnails,
               t.source_url, t.status, t.error, t.attempts
        FROM thumbnails_due d
        LEFT JOIN sketchfab_models m ON m.uid = d.uid
        LEFT JOIN model_thumbnails t ON t.uid = d.uid
        WHERE {shard.sql_predicate("d.uid")}
        ORDER BY m.published_at DESC NULLS LAST, d.uid
    """  # noqa: S608 (the predicate is built from two integers)


DROP_GONE = """
DELETE FROM thumbnails_due d WHERE d.uid = ANY(%s)
AND NOT EXISTS (SELECT 1 FROM sketchfab_models m WHERE m.uid = d.uid AND m.deleted_at IS NULL)
"""


SETTLE = """
DELETE FROM thumbnails_due d
USING unnest(%s::text[], %s::jsonb[]) AS settled (uid, thumbnails), sketchfab_models m
WHERE d.uid = settled.uid AND m.uid = settled.uid AND m.thumbnails = settled.thumbnails
"""
SETTLE_BATCH = 5000
REANALYZE_AFTER = 10_000
"""The list grew or shrank by more than this: fresh statistics, so that the plan query is planned
for the list as it is now (nested loops over a short list, not hash joins of whole tables)."""


def reanalyze_if_many(cur: Any, changed: int) -> None:
    if changed > REANALYZE_AFTER:
        cur.execute("ANALYZE thumbnails_due")


def settle(cur: Any, judged: list[tuple[str, str]]) -> int:
    """Take models judged to need nothing off the list, each only while its thumbnail list is still
    the one judged (a crawl may have changed it since; its trigger then kept it listed)."""
    if not judged:
        return 0
    uids, lists = zip(*judged, strict=True)
    cur.execute(SETTLE, (list(uids), list(lists)))
    return cur.rowcount


def list_all_if_settings_changed(cur: Any, settings: Settings) -> None:
    """List every model when the settings a plan depends on differ from the recorded ones."""
    wanted = {"input_size": settings.input_size, "max_download_attempts": settings.max_download_attempts}
    recorded = state_value(cur, PLAN_STATE_KEY)
    if recorded == wanted:
        return
    log.info(
        "Download settings are now %s (were %s): every model is looked at once.", wanted, recorded or None
    )
    cur.execute(
        "INSERT INTO thumbnails_due (uid) SELECT uid FROM sketchfab_models WHERE deleted_at IS NULL "
        "ON CONFLICT DO NOTHING"
    )
    reanalyze_if_many(cur, cur.rowcount)
    set_state_value(cur, PLAN_STATE_KEY, wanted)


def plan_downloads(settings: Settings, shard: Shard = WHOLE) -> DownloadPlan:
    """What to fetch: no row yet, a changed chosen URL, or a transient failure with attempts left.

    Only models listed in `thumbnails_due` are read. A listed model that needs nothing is taken off
    the list here; one sent to download stays listed until a later plan finds its result recorded.
    Listed models that are gone or deleted are taken off too (a reappearing model is listed again).
    """
    plan = DownloadPlan()
    judged: list[tuple[str, str]] = []  # settled a batch at a time: memory stays bounded
    gone: list[str] = []
    changed = 0
    with connect(settings.db_url) as conn:
        with conn.cursor() as cur:
            list_all_if_settings_changed(cur, settings)
        conn.commit()
        with conn.cursor(name="plan_downloads") as listed, conn.cursor() as cur:
            listed.itersize = 5000
            listed.execute(plan_query(shard))
            for uid, live, images, stored_url, status, error, attempts in listed:
                if not live:
                    gone.append(uid)
                    continue
                url = choose_thumbnail(images, settings.input_size)
                skip = skip_reason(url, stored_url, status, error, attempts, settings.max_download_attempts)
                if skip:
                    plan.skipped_by_reason[skip] += 1
                    judged.append((uid, json.dumps(images)))
                else:
                    plan.tasks.append(DownloadTask(uid, url))
                if len(judged) >= SETTLE_BATCH:
                    changed += settle(cur, judged)
                    judged.clear()
            changed += settle(cur, judged)
            cur.execute(DROP_GONE, (gone,))
            reanalyze_if_many(cur, changed + cur.rowcount)
    return plan


def skip_reason(
    url: str | None,
    stored_url: str | None,
    status: str | None,
    error: str | None,
    attempts: int,
    max_attempts: int,
) -> str | None:
    """Why a model needs no download now, or None when it does."""
    if status is None or url != stored_url:
        return None
    if status == "ok":
        return "up to date"
    if not (error or "").startswith(f"[{TRANSIENT}]"):
        return "permanent failure"
    if attempts >= max_attempts:
        return "attempts exhausted"
    return None


def pending_downloads(settings: Settings, shard: Shard = WHOLE) -> list[DownloadTask]:
    return plan_downloads(settings, shard).tasks
