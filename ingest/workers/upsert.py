"""The upsert worker: keeps the deals table fresh.

Each poll fetches the newest deals (sortType 1, a few pages), keeps those past the watermark,
sorts them oldest first itself (Keepa's "newest" order is not strict) and saves them as
`pending` in checkpoint 'upsert' (`checkpoints.UpsertWatermark`). Batches are then stored
oldest first, each advancing the watermark to the last deal it stored, in the same fenced
transaction.

With tokens to spare it retries incomplete deals (backoff per deal) and refreshes deals not
fetched for `refresh_after_s`; the janitor (janitor.py) runs here every `janitor_interval_s`.
"""

import logging
from dataclasses import dataclass, replace

from .. import backup, retention
from .. import deals as store_deals
from ..checkpoints import UpsertWatermark, load_upsert
from ..query import load_query, page_selection
from ..settings import parse, section_extra, setting
from ..token_model import LedgerPolicy
from . import janitor
from .base import PAGE_SIZE, Worker

log = logging.getLogger("ingest.upsert")

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
        self.retention = retention.RetentionSettings.from_config(self.config)
        self.call_log_days = LedgerPolicy.from_config(self.config).call_log_days
        self.backups = backup.BackupSettings.from_config(self.config)
        self._next_retention_at = 0.0
        self._polls = 0
        self.checkpoint: UpsertWatermark | None = None  # as of the last step

    def setup(self) -> None:
        query, source = load_query(self.query_option, self.config)
        self.query = {**query, "sortType": 1}
        log.info("deal query from %s, newest first", source)

    def load_checkpoint(self) -> UpsertWatermark:
        return load_upsert(self.conn) or UpsertWatermark()

    def describe_position(self) -> str:
        c = self.checkpoint or UpsertWatermark()
        return f"watermark {c.watermark} ({len(c.pending)} pending)"

    # ------------------------------------------------------------ work

    def step(self) -> bool:
        checkpoint = self.checkpoint = self.load_checkpoint()
        now = self.clock.wall()
        if checkpoint.pending:
            self.process_pending(checkpoint)
            return True
        if now >= checkpoint.next_poll_at:
            self.poll(checkpoint)
            return True
        if now >= self._next_janitor_at:
            self._next_janitor_at = now + self.janitor.interval_s
            janitor.sweep(self.conn, self.commit, self.name, now, self.janitor)
        self.maintenance(now)
        return self.spare_work()

    def maintenance(self, now: float) -> None:
        """Retention (small fenced deletes, then incremental_vacuum) every [retention] every_s,
        and a backup when [backup] every_h says one is due."""
        if now >= self._next_retention_at:
            self._next_retention_at = now + self.retention.every_s
            report = retention.prune(self.conn, self.commit, now, self.retention, self.call_log_days,
                                     stop=self.stop.is_set)
            if report.total:
                log.info("retention: deleted %s; %d pages returned to the disk (%.1f s)",
                         ", ".join(f"{n} {t}" for t, n in report.deleted.items()), report.pages_freed, report.seconds)
        backup.scheduled_backup(self.db_path, self.conn, now, self.backups)

    def poll(self, checkpoint: UpsertWatermark) -> None:
        watermark = checkpoint.watermark
        deals: list[dict] = []
        pages = 0
        # The first poll only sets the watermark (unless [upsert] start_from = "listed"): the deals
        # listed now are backfill's to store, and buying them here too, while backfill pages
        # through the same newest-first results, would pay for each product twice.
        starting = watermark is None and self.start_from == "now"
        for page_number in range(1 if starting else self.max_pages):
            page = self.keepa.deals(page_selection(self.query, page_number), page_number)
            pages += 1
            deals.extend(page.deals)
            stamps = [d.get("lastUpdate") or 0 for d in page.deals if isinstance(d, dict)]
            if len(page.deals) < PAGE_SIZE or (watermark is not None and stamps and min(stamps) <= watermark):
                break
        fresh = new_listings(deals, watermark, set(checkpoint.at_watermark))
        if starting:
            checkpoint = checkpoint.advance(fresh)
            log.info("first poll: watermark set at the newest listed deal (%s); older deals are backfill's",
                     checkpoint.watermark)
            fresh = []
        checkpoint = self.checkpoint = replace(checkpoint, pending=tuple(fresh),
                                               next_poll_at=self.clock.wall() + self.poll_s)
        self._polls += 1
        self.commit_page("upsert poll", "upsert", checkpoint, pages=pages, deals_seen=len(fresh),
                         detail=self._detail(checkpoint))
        log.debug("poll: %d deals listed, %d new since watermark %s", len(deals), len(fresh), watermark)

    def process_pending(self, checkpoint: UpsertWatermark) -> None:
        """Store the oldest pending deals (one product batch, plus any already current, which
        cost nothing) and move the watermark past exactly those."""
        pending = checkpoint.pending
        current = store_deals.already_current(self.conn, list(pending))
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
        checkpoint = self.checkpoint = replace(checkpoint.advance(handled), pending=pending[len(handled):])
        self.commit_batch("upsert batch", "upsert", asins, {l.asin: l for l in batch}, products,
                          touched=[l for l in handled if l.asin in current],
                          checkpoint=checkpoint, detail=self._detail(checkpoint))

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
        return self._polls > 0 and not (self.checkpoint and self.checkpoint.pending)

    def idle_wait_s(self) -> float:
        next_poll_at = self.checkpoint.next_poll_at if self.checkpoint else 0.0
        return max(1.0, min(30.0, next_poll_at - self.clock.wall()))

    @staticmethod
    def _detail(checkpoint: UpsertWatermark) -> dict:
        return {
            "watermark": checkpoint.watermark,
            "pending": len(checkpoint.pending),
            "next_poll_at": checkpoint.next_poll_at,
        }
