"""`ingest deals recompute`: re-run analytics over every stored history, at zero token cost."""

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from . import deals as store_deals
from .analytics import AnalyticsParams, evaluate_deal
from .backends import transaction

CHUNK = 500


@dataclass
class RecomputeResult:
    examined: int = 0
    changed: int = 0
    skipped_refetched: int = 0  # a worker stored a newer fetch while we computed: theirs stands


def recompute_all(conn, params: AnalyticsParams, now: float,
                  progress: Callable[[int, int], None] | None = None) -> RecomputeResult:
    """Evaluate every stored product again; update deals whose outcome changed and log the
    decision (worker 'recompute'). Chunks of CHUNK rows per transaction keep workers moving."""
    result = RecomputeResult()
    total = conn.execute("SELECT count(*) FROM product_history").fetchone()[0]
    now_dt = datetime.fromtimestamp(now, tz=timezone.utc)
    ctx = store_deals.WriteContext("recompute", 0, now, "recompute")
    last_asin = ""
    while True:
        rows = conn.execute(
            "SELECT h.asin, h.fetched_at, h.product_z, d.status, d.reason, d.one_year_avg_cents"
            " FROM product_history h JOIN deals d USING (asin) WHERE h.asin > ? ORDER BY h.asin LIMIT ?",
            (last_asin, CHUNK),
        ).fetchall()
        if not rows:
            break
        last_asin = rows[-1]["asin"]
        updates = []
        for row in rows:
            result.examined += 1
            evaluation = evaluate_deal(store_deals.decompress_product(row["product_z"]), now_dt, params)
            avg = evaluation.average
            value = avg.value_cents if avg else None
            if (evaluation.status, evaluation.reason, value) != (row["status"], row["reason"], row["one_year_avg_cents"]):
                updates.append((row["asin"], row["fetched_at"], evaluation, value))
        with transaction(conn):
            for asin, fetched_at, evaluation, value in updates:
                avg = evaluation.average
                changed = conn.execute(
                    "UPDATE deals SET status = ?, reason = ?, one_year_avg_cents = ?, avg_reason = ?,"
                    " avg_sales = ?, source = 'recompute' WHERE asin = ? AND last_fetched = ?",
                    (evaluation.status, evaluation.reason, value, avg.reason if avg else None,
                     avg.sales if avg else None, asin, fetched_at),
                ).rowcount
                if changed:
                    store_deals.log_decision(conn, ctx, asin, evaluation.status, evaluation.reason, value)
                    result.changed += 1
                else:
                    result.skipped_refetched += 1
        if progress:
            progress(result.examined, total)
    return result
