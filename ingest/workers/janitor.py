"""The janitor: removes deals that are no longer listed, but only when that is provable.

A deal is removed when it has not been seen for `grace_s` (default 72 h) AND a complete backfill
pass started after it was last seen (so the pass had the chance to list it and did not), while
ingestion is healthy (a successful Keepa fetch within `healthy_within_s`), and never more than
`max_share` of the table in one sweep. A stalled ingestion therefore deletes nothing: the old
system's janitor emptied the table while nothing was being refreshed.
"""

import logging
from dataclasses import dataclass
from typing import Callable, ContextManager

from .. import deals as store_deals
from ..checkpoints import load_backfill
from ..settings import parse, setting

log = logging.getLogger("ingest.janitor")


@dataclass(frozen=True)
class JanitorSettings:
    grace_s: float = setting(72 * 3600.0, "a deal unseen this long (and missed by a whole pass) may go", min=0, max=365 * 86400)
    healthy_within_s: float = setting(15 * 60.0, "only while a fetch succeeded this recently", above=0, max=7 * 86400)
    max_share: float = setting(0.05, "at most this share of the table per sweep", above=0, max=0.2)
    interval_s: float = setting(600.0, "a sweep this often", min=1, max=7 * 86400)

    @classmethod
    def from_config(cls, config: dict) -> "JanitorSettings":
        return parse(cls, config.get("janitor"), "janitor")


def removal_cutoff(conn, now: float, settings: JanitorSettings) -> tuple[float | None, str]:
    """The last_seen time below which deals may go, or (None, why not)."""
    last_success = conn.execute("SELECT max(last_success_at) FROM worker_progress").fetchone()[0]
    if last_success is None or now - last_success > settings.healthy_within_s:
        return None, "ingestion is not healthy (no successful fetch recently)"
    cursor = load_backfill(conn)
    complete_pass_start = cursor.last_complete_pass_started_at if cursor else None
    if complete_pass_start is None:
        return None, "no complete backfill pass yet"
    return min(now - settings.grace_s, complete_pass_start), "ok"


FencedCommit = Callable[[str, str], ContextManager[tuple]]  # Worker.commit: (what, source) -> (conn, ctx)


def sweep(conn, commit: FencedCommit, worker: str, now: float, settings: JanitorSettings) -> int:
    """One janitor pass: reads on `conn`, removes in one fenced `commit` of `worker` (the
    lease holder running it). Returns the number removed."""
    cutoff, why = removal_cutoff(conn, now, settings)
    if cutoff is None:
        log.debug("janitor skipped: %s", why)
        return 0
    asins = store_deals.janitor_candidates(conn, cutoff, settings.max_share)
    if not asins:
        return 0
    with commit("janitor", "janitor") as (write, ctx):
        removed = store_deals.remove_deals(write, ctx, asins, f"unseen_{int(settings.grace_s // 3600)}h")
        store_deals.update_progress(write, worker, ctx.now, counters={"removed": removed})
    log.info("janitor removed %d deals unseen since %.0f", removed, cutoff)
    return removed
