"""The backfill worker: pages through the whole deal query, again and again.

Its cursor (checkpoint 'backfill', `checkpoints.BackfillCursor`) is advanced in the same fenced
transaction as the rows it covers, so a crash at any point resumes exactly where the last
commit left off.

A fetched page is saved (as `pending`) before any of its products is fetched, so the page is
never fetched twice and never skipped; each product batch then removes its ASINs from
`pending` in the transaction that stores them.
"""

import logging
from dataclasses import dataclass, replace

from .. import deals as store_deals
from ..checkpoints import BackfillCursor, load_backfill, save as save_checkpoint
from ..query import load_query, page_selection, query_fingerprint
from ..settings import parse, section_extra, setting
from .base import PAGE_SIZE, Worker

log = logging.getLogger("ingest.backfill")


@dataclass(frozen=True)
class BackfillSettings:
    """[backfill]: also takes the [worker] keys (overriding them) and `query` (both workers' query)."""

    pass_pause_s: float = setting(600.0, "pause between the end of a pass and the next", min=0, max=7 * 86400)

    @classmethod
    def from_config(cls, config: dict) -> "BackfillSettings":
        return parse(cls, config.get("backfill"), "backfill", extra=section_extra("backfill"))


class BackfillWorker(Worker):
    name = "backfill"

    def __init__(self, *args, query_option: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.query_option = query_option
        self.pass_pause_s = BackfillSettings.from_config(self.config).pass_pause_s
        self.cursor: BackfillCursor | None = None  # as of the last step
        self._passes_finished = 0

    def setup(self) -> None:
        self.query, self.query_source = load_query(self.query_option, self.config)
        self.fingerprint = query_fingerprint(self.query)
        log.info("deal query from %s (%s)", self.query_source, self.fingerprint)

    # ------------------------------------------------------------ cursor

    def load_cursor(self) -> BackfillCursor:
        cursor = load_backfill(self.conn)
        if cursor is not None and cursor.query == self.fingerprint:
            return cursor
        if cursor is not None:
            log.info("deal query changed: starting a new pass from page 0")
        previous = cursor or BackfillCursor()
        return BackfillCursor(query=self.fingerprint, pass_number=previous.pass_number + 1,
                              pass_started_at=self.clock.wall(),
                              last_complete_pass_started_at=previous.last_complete_pass_started_at)

    def describe_position(self) -> str:
        c = self.cursor
        if c is None:
            return "no cursor yet"
        return f"pass {c.pass_number} page {c.page}" + (f" ({c.pending_count()} pending)" if c.pending else "")

    # ------------------------------------------------------------ work

    def step(self) -> bool:
        cursor = self.cursor = self.load_cursor()
        if cursor.between_passes(self.clock.wall()):
            return False
        if cursor.pending is None:
            self.fetch_page(cursor)
        elif cursor.pending:
            self.process_batch(cursor)
        else:
            self.finish_page(cursor)
        return True

    def fetch_page(self, cursor: BackfillCursor) -> None:
        page = self.keepa.deals(page_selection(self.query, cursor.page), cursor.page)
        listings, seen = [], set()
        for deal in page.deals:
            if isinstance(deal, dict) and deal.get("asin") and deal["asin"] not in seen:
                seen.add(deal["asin"])
                listings.append(store_deals.Listing.from_deal(deal))
        cursor = self.cursor = replace(cursor, pending=tuple(listings), last_page=len(page.deals) < PAGE_SIZE,
                                       next_pass_at=None)
        self.commit_page(f"backfill page {cursor.page}", "backfill", cursor, pages=1, deals_seen=len(listings),
                         detail=self._detail(cursor))

    def process_batch(self, cursor: BackfillCursor) -> None:
        pending = cursor.pending
        fresh = store_deals.already_current(self.conn, list(pending))
        to_fetch = [l for l in pending if l.asin not in fresh]
        batch = to_fetch[: self.keepa.product_batch_size(100)] if to_fetch else []
        batch_asins = [l.asin for l in batch]
        products = self.fetch_products(batch_asins) if batch else {}
        done = set(batch_asins) | fresh
        cursor = self.cursor = replace(cursor, pending=tuple(l for l in pending if l.asin not in done))
        self.commit_batch(f"backfill batch page {cursor.page}", "backfill", batch_asins,
                          {l.asin: l for l in batch}, products,
                          touched=[l for l in pending if l.asin in fresh],
                          checkpoint=cursor, detail=self._detail(cursor))

    def finish_page(self, cursor: BackfillCursor) -> None:
        now = self.clock.wall()
        if cursor.last_page:
            log.info("pass %d complete after %d pages", cursor.pass_number, cursor.page + 1)
            self._passes_finished += 1
            cursor = replace(cursor, pass_number=cursor.pass_number + 1, page=0, pending=None, last_page=False,
                             last_complete_pass_started_at=cursor.pass_started_at,
                             next_pass_at=now + self.pass_pause_s, pass_started_at=now + self.pass_pause_s)
            counters = {"passes": 1}
        else:
            cursor = replace(cursor, page=cursor.page + 1, pending=None)
            counters = {}
        self.cursor = cursor
        with self.commit("backfill cursor", "backfill") as (conn, ctx):
            save_checkpoint(conn, ctx, cursor)
            store_deals.update_progress(conn, self.name, ctx.now, last_commit_at=ctx.now,
                                        detail=self._detail(cursor), counters=counters)

    def pass_done(self) -> bool:
        """--once stops after the pass in progress, or at once when between passes."""
        between_passes = self.cursor is not None and self.cursor.between_passes(self.clock.wall())
        return self._passes_finished > 0 or between_passes

    def idle_wait_s(self) -> float:
        if self.cursor is not None and self.cursor.next_pass_at:
            return max(1.0, min(30.0, self.cursor.next_pass_at - self.clock.wall()))
        return 5.0

    @staticmethod
    def _detail(cursor: BackfillCursor) -> dict:
        return {
            "pass": cursor.pass_number,
            "page": cursor.page,
            "pending": cursor.pending_count(),
            "next_pass_at": cursor.next_pass_at,
            "last_complete_pass_started_at": cursor.last_complete_pass_started_at,
        }
