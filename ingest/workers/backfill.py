"""The backfill worker: pages through the whole deal query, again and again.

Its cursor (checkpoint 'backfill') is advanced in the same fenced transaction as the rows it
covers, so a crash at any point resumes exactly where the last commit left off:

  {"query": fingerprint, "pass": n, "page": p, "pass_started_at": t,
   "pending": [listing, ...] | null,  # the page's deals not yet stored; null = fetch page p
   "last_page": bool,                 # page p was shorter than a full page: the pass ends after it
   "next_pass_at": t | null,          # pause between passes
   "last_complete_pass_started_at": t | null}   # the janitor trusts only complete passes

A fetched page is saved (as `pending`) before any of its products is fetched, so the page is
never fetched twice and never skipped; each product batch then removes its ASINs from
`pending` in the transaction that stores them.
"""

import logging
from dataclasses import dataclass

from .. import deals as store_deals
from ..query import load_query, page_selection, query_fingerprint
from ..settings import parse, section_extra, setting
from .base import Worker

log = logging.getLogger("ingest.backfill")

CHECKPOINT = "backfill"
PAGE_SIZE = 150


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
        self._passes_finished = 0

    def setup(self) -> None:
        self.query, self.query_source = load_query(self.query_option, self.config)
        self.fingerprint = query_fingerprint(self.query)
        log.info("deal query from %s (%s)", self.query_source, self.fingerprint)

    # ------------------------------------------------------------ cursor

    def load_cursor(self) -> dict:
        cursor = store_deals.load_checkpoint(self.conn, CHECKPOINT)
        if cursor is None or cursor.get("query") != self.fingerprint:
            if cursor is not None:
                log.info("deal query changed: starting a new pass from page 0")
            previous = cursor or {}
            cursor = {
                "query": self.fingerprint,
                "pass": previous.get("pass", 0) + 1,
                "page": 0,
                "pass_started_at": self.clock.wall(),
                "pending": None,
                "last_page": False,
                "next_pass_at": None,
                "last_complete_pass_started_at": previous.get("last_complete_pass_started_at"),
            }
        return cursor

    def describe_position(self) -> str:
        c = getattr(self, "_cursor", None) or {}
        pending = c.get("pending")
        return f"pass {c.get('pass')} page {c.get('page')}" + (f" ({len(pending)} pending)" if pending else "")

    # ------------------------------------------------------------ work

    def step(self) -> bool:
        cursor = self._cursor = self.load_cursor()
        if cursor.get("next_pass_at") and self.clock.wall() < cursor["next_pass_at"]:
            return False
        if cursor["pending"] is None:
            self.fetch_page(cursor)
        elif cursor["pending"]:
            self.process_batch(cursor)
        else:
            self.finish_page(cursor)
        return True

    def fetch_page(self, cursor: dict) -> None:
        page = self.keepa.deals(page_selection(self.query, cursor["page"]), cursor["page"])
        self._count_tokens(page.envelope)
        listings, seen = [], set()
        for deal in page.deals:
            if isinstance(deal, dict) and deal.get("asin") and deal["asin"] not in seen:
                seen.add(deal["asin"])
                listings.append(store_deals.Listing.from_deal(deal))
        cursor.update(pending=[l.to_json() for l in listings], last_page=len(page.deals) < PAGE_SIZE,
                      next_pass_at=None)
        with self.commit(f"backfill page {cursor['page']}", "backfill") as (conn, ctx):
            store_deals.save_checkpoint(conn, ctx, CHECKPOINT, cursor)
            store_deals.update_progress(conn, self.name, ctx.now, state="working", last_success_at=ctx.now,
                                        last_commit_at=ctx.now, detail=self._detail(cursor),
                                        counters={"pages": 1, "deals_seen": len(listings),
                                                  "tokens_spent": self.take_unrecorded_tokens()})
        self._period["pages"] += 1

    def process_batch(self, cursor: dict) -> None:
        pending = [store_deals.Listing.from_json(p) for p in cursor["pending"]]
        fresh = store_deals.already_current(self.conn, pending)
        to_fetch = [l for l in pending if l.asin not in fresh]
        batch = to_fetch[: self.keepa.product_batch_size(100)] if to_fetch else []
        batch_asins = [l.asin for l in batch]
        products = self.fetch_products(batch_asins) if batch else {}
        done = set(batch_asins) | fresh
        cursor["pending"] = [l.to_json() for l in pending if l.asin not in done]
        self.commit_batch(f"backfill batch page {cursor['page']}", "backfill", batch_asins,
                          {l.asin: l for l in batch}, products,
                          touched=[l for l in pending if l.asin in fresh],
                          checkpoint=(CHECKPOINT, cursor), detail=self._detail(cursor))

    def finish_page(self, cursor: dict) -> None:
        now = self.clock.wall()
        if cursor["last_page"]:
            log.info("pass %d complete after %d pages", cursor["pass"], cursor["page"] + 1)
            self._passes_finished += 1
            cursor.update(page=0, pending=None, last_page=False,
                          last_complete_pass_started_at=cursor["pass_started_at"],
                          next_pass_at=now + self.pass_pause_s, pass_started_at=now + self.pass_pause_s)
            cursor["pass"] += 1
            counters = {"passes": 1}
        else:
            cursor.update(page=cursor["page"] + 1, pending=None)
            counters = {}
        with self.commit("backfill cursor", "backfill") as (conn, ctx):
            store_deals.save_checkpoint(conn, ctx, CHECKPOINT, cursor)
            store_deals.update_progress(conn, self.name, ctx.now, last_commit_at=ctx.now,
                                        detail=self._detail(cursor), counters=counters)

    def pass_done(self) -> bool:
        """--once stops after the pass in progress, or at once when between passes."""
        cursor = getattr(self, "_cursor", None) or {}
        between_passes = bool(cursor.get("next_pass_at")) and self.clock.wall() < cursor["next_pass_at"]
        return self._passes_finished > 0 or between_passes

    def idle_wait_s(self) -> float:
        cursor = getattr(self, "_cursor", None) or {}
        if cursor.get("next_pass_at"):
            return max(1.0, min(30.0, cursor["next_pass_at"] - self.clock.wall()))
        return 5.0

    @staticmethod
    def _detail(cursor: dict) -> dict:
        return {
            "pass": cursor["pass"],
            "page": cursor["page"],
            "pending": len(cursor["pending"] or []),
            "next_pass_at": cursor.get("next_pass_at"),
            "last_complete_pass_started_at": cursor.get("last_complete_pass_started_at"),
        }
