"""The upsert worker: keeps the deals table fresh.

Each poll fetches the newest deals (sortType 1, a few pages), keeps those past the watermark,
sorts them oldest first itself (Keepa's "newest" order is not strict) and saves them as
`pending` in checkpoint 'upsert'. Batches are then stored oldest first, each advancing the
watermark to the last deal it stored, in the same fenced transaction:

  {"watermark": keepa_minute | null, "at_watermark": [asin, ...],   # stored at exactly that minute
   "pending": [listing, ...], "next_poll_at": t}

With tokens to spare it retries incomplete deals (backoff per deal) and refreshes deals not
fetched for `refresh_after_s`; the janitor (janitor.py) runs here every `janitor_interval_s`.
"""

import logging
from dataclasses import dataclass

from .. import deals as store_deals
from ..query import load_query, page_selection
from ..settings import parse, section_extra, setting
from . import janitor
from .backfill import PAGE_SIZE
from .base import Worker

log = logging.getLogger("ingest.upsert")

CHECKPOINT = "upsert"


def _order_key(listing: store_deals.Listing):
    return (listing.last_update or 0, listing.asin)


def new_listings(deals: list[dict], watermark: int | None, at_watermark: set[str]) -> list[store_deals.Listing]:
    """Deals past the watermark, one per ASIN (its newest), oldest first."""
    newest: dict[str, store_deals.Listing] = {}
    for deal in deals:
        if not isinstance(deal, dict) or not deal.get("asin"):
            continue
        listing = store_deals.Listing.from_deal(deal)
        stamp = listing.last_update or 0
        if watermark is not None and (stamp < watermark or (stamp == watermark and listing.asin in at_watermark)):
            continue
        if listing.asin not in newest or stamp > (newest[listing.asin].last_update or 0):
            newest[listing.asin] = listing
    return sorted(newest.values(), key=_order_key)


def advance_watermark(checkpoint: dict, stored: list[store_deals.Listing]) -> None:
    """Move the watermark to the newest of `stored` (which are all older than what is pending)."""
    for listing in stored:
        stamp = listing.last_update or 0
        if checkpoint["watermark"] is None or stamp > checkpoint["watermark"]:
            checkpoint["watermark"] = stamp
            checkpoint["at_watermark"] = [listing.asin]
        elif stamp == checkpoint["watermark"] and listing.asin not in checkpoint["at_watermark"]:
            checkpoint["at_watermark"].append(listing.asin)


@dataclass(frozen=True)
class UpsertSettings:
    """[upsert]: also takes the [worker] keys (overriding them)."""

    poll_s: float = setting(60.0, "poll the newest deals this often (Keepa caches deal results ~120 s)",
                            min=0.1, max=86400)
    max_pages: int = setting(3, "newest pages read per poll", min=1, max=67)
    refresh_after_s: float = setting(24 * 3600.0, "refetch a stored deal's product after this long",
                                     min=60, max=365 * 86400)
    min_spare_batch: int = setting(20, "spend spare tokens in batches of at least this many products", min=1, max=100)
    start_from: str = setting("now", "first poll: 'now' sets the watermark, 'listed' buys what is listed",
                              choices=("now", "listed"))

    @classmethod
    def from_config(cls, config: dict) -> "UpsertSettings":
        return parse(cls, config.get("upsert"), "upsert", extra=section_extra("upsert"))


class UpsertWorker(Worker):
    name = "upsert"

    def __init__(self, *args, query_option: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.query_option = query_option
        settings = UpsertSettings.from_config(self.config)
        self.poll_s = settings.poll_s
        self.max_pages = settings.max_pages
        self.refresh_after_s = settings.refresh_after_s
        self.min_spare_batch = settings.min_spare_batch
        self.start_from = settings.start_from
        self.janitor = janitor.JanitorSettings.from_config(self.config)
        self._next_janitor_at = 0.0
        self._polls = 0

    def setup(self) -> None:
        query, source = load_query(self.query_option, self.config)
        self.query = {**query, "sortType": 1}
        log.info("deal query from %s, newest first", source)

    def load_checkpoint(self) -> dict:
        checkpoint = store_deals.load_checkpoint(self.conn, CHECKPOINT)
        return checkpoint or {"watermark": None, "at_watermark": [], "pending": [], "next_poll_at": 0}

    def describe_position(self) -> str:
        c = getattr(self, "_checkpoint", None) or {}
        return f"watermark {c.get('watermark')} ({len(c.get('pending') or [])} pending)"

    # ------------------------------------------------------------ work

    def step(self) -> bool:
        checkpoint = self._checkpoint = self.load_checkpoint()
        now = self.clock.wall()
        if checkpoint["pending"]:
            self.process_pending(checkpoint)
            return True
        if now >= checkpoint.get("next_poll_at", 0):
            self.poll(checkpoint)
            return True
        if now >= self._next_janitor_at:
            self._next_janitor_at = now + self.janitor.interval_s
            janitor.sweep(self)
        return self.spare_work()

    def poll(self, checkpoint: dict) -> None:
        watermark = checkpoint["watermark"]
        deals: list[dict] = []
        pages = 0
        # The first poll only sets the watermark (unless [upsert] start_from = "listed"): the deals
        # listed now are backfill's to store, and buying them here too, while backfill pages
        # through the same newest-first results, would pay for each product twice.
        starting = watermark is None and self.start_from == "now"
        for page_number in range(1 if starting else self.max_pages):
            page = self.keepa.deals(page_selection(self.query, page_number), page_number)
            self._count_tokens(page.envelope)
            pages += 1
            deals.extend(page.deals)
            stamps = [d.get("lastUpdate") or 0 for d in page.deals if isinstance(d, dict)]
            if len(page.deals) < PAGE_SIZE or (watermark is not None and stamps and min(stamps) <= watermark):
                break
        fresh = new_listings(deals, watermark, set(checkpoint["at_watermark"]))
        if starting:
            advance_watermark(checkpoint, fresh)
            log.info("first poll: watermark set at the newest listed deal (%s); older deals are backfill's",
                     checkpoint["watermark"])
            fresh = []
        checkpoint["pending"] = [l.to_json() for l in fresh]
        checkpoint["next_poll_at"] = self.clock.wall() + self.poll_s
        self._polls += 1
        with self.commit("upsert poll", "upsert") as (conn, ctx):
            store_deals.save_checkpoint(conn, ctx, CHECKPOINT, checkpoint)
            store_deals.update_progress(conn, self.name, ctx.now, state="working", last_success_at=ctx.now,
                                        last_commit_at=ctx.now, detail=self._detail(checkpoint),
                                        counters={"pages": pages, "deals_seen": len(fresh),
                                                  "tokens_spent": self.take_unrecorded_tokens()})
        self._period["pages"] += pages
        log.debug("poll: %d deals listed, %d new since watermark %s", len(deals), len(fresh), watermark)

    def process_pending(self, checkpoint: dict) -> None:
        """Store the oldest pending deals (one product batch, plus any already current, which
        cost nothing) and move the watermark past exactly those."""
        pending = [store_deals.Listing.from_json(p) for p in checkpoint["pending"]]
        current = store_deals.already_current(self.conn, pending)
        limit = self.keepa.product_batch_size(100) if len(current) < len(pending) else 0
        handled, batch = [], []
        for listing in pending:
            if listing.asin not in current:
                if len(batch) == limit:
                    break
                batch.append(listing)
            handled.append(listing)
        asins = [l.asin for l in batch]
        products = self.fetch_products(asins) if batch else {}
        checkpoint["pending"] = [l.to_json() for l in pending[len(handled):]]
        advance_watermark(checkpoint, handled)
        self.commit_batch("upsert batch", "upsert", asins, {l.asin: l for l in batch}, products,
                          touched=[l for l in handled if l.asin in current],
                          checkpoint=(CHECKPOINT, checkpoint), detail=self._detail(checkpoint))

    def spare_work(self) -> bool:
        """Retry due incomplete deals, then refresh stale ones, only with tokens to spare."""
        now = self.clock.wall()
        candidates = store_deals.due_for_retry(self.conn, now, 100)
        source = "retry"
        if not candidates:
            candidates = store_deals.due_for_refresh(self.conn, now - self.refresh_after_s, 100)
            source = "refresh"
        if not candidates:
            return False
        affordable = self.keepa.product_batch_size(100)
        if affordable < min(self.min_spare_batch, len(candidates)):
            return False
        asins = candidates[:affordable]
        products = self.fetch_products(asins)
        counts = self.commit_batch(f"upsert {source}", source, asins, {}, products)
        log.info("%s: %d deals (%s)", source, len(asins), ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        return True

    def pass_done(self) -> bool:
        checkpoint = getattr(self, "_checkpoint", None) or {}
        return self._polls > 0 and not checkpoint.get("pending")

    def idle_wait_s(self) -> float:
        checkpoint = getattr(self, "_checkpoint", None) or {}
        return max(1.0, min(30.0, checkpoint.get("next_poll_at", 0) - self.clock.wall()))

    @staticmethod
    def _detail(checkpoint: dict) -> dict:
        return {
            "watermark": checkpoint["watermark"],
            "pending": len(checkpoint["pending"]),
            "next_poll_at": checkpoint.get("next_poll_at"),
        }
