"""The deals table and everything written beside it: stored histories, the decision log,
checkpoints and worker progress. Functions here never open transactions: callers run them
inside a worker's fenced transaction (or `store.transaction` for admin commands)."""

import json
import zlib
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Iterable

STATUSES = ("accepted", "rejected", "incomplete")


@dataclass(frozen=True)
class Listing:
    """A deal as a /deal page lists it: what we know before fetching the product."""

    asin: str
    title: str | None = None
    category: int | None = None
    sales_rank: int | None = None
    used_price_cents: int | None = None
    new_price_cents: int | None = None
    last_update: int | None = None  # Keepa minutes

    @classmethod
    def from_deal(cls, deal: dict) -> "Listing":
        current = deal.get("current") or []

        def slot(i):
            value = current[i] if len(current) > i else None
            return value if isinstance(value, int) and value >= 0 else None

        return cls(
            asin=str(deal["asin"]),
            title=deal.get("title"),
            category=deal.get("rootCat"),
            sales_rank=slot(3),
            used_price_cents=slot(2),
            new_price_cents=slot(1),
            last_update=deal.get("lastUpdate"),
        )

    def to_json(self) -> dict:
        return self.__dict__.copy()

    @classmethod
    def from_json(cls, data: dict) -> "Listing":
        return cls(**data)


@dataclass(frozen=True)
class WriteContext:
    """Who is writing: stamped on every row so any change can be traced to a lease epoch."""

    worker: str
    fence: int
    now: float
    source: str
    domain: int | None = None   # the Keepa marketplace of what is written (deals.domain), if known


def compress_product(product: dict) -> bytes:
    return zlib.compress(json.dumps(product, separators=(",", ":")).encode(), 6)


def decompress_product(blob: bytes) -> dict:
    return json.loads(zlib.decompress(blob))


def log_decision(conn, ctx: WriteContext, asin: str, outcome: str, reason: str, avg: int | None) -> None:
    conn.execute(
        "INSERT INTO decisions (at, worker, asin, outcome, reason, one_year_avg_cents, fence)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (ctx.now, ctx.worker, asin, outcome, reason, avg, ctx.fence),
    )


def _with_listing(values: dict, listing: Listing | None) -> dict:
    """Deal columns the listing fills in where the product left them empty."""
    if listing is None:
        return values
    row = {**values, "deal_last_update": listing.last_update}
    for key in ("title", "category", "sales_rank", "used_price_cents", "new_price_cents"):
        if row.get(key) is None and getattr(listing, key) is not None:
            row[key] = getattr(listing, key)
    return row


def _deal_statement(ctx: WriteContext, outcome: "Outcome", exists: bool, values: dict) -> tuple[str, dict]:
    """The INSERT or UPDATE of one deal row. A listing (seen in a deal page) refreshes last_seen."""
    row = {"asin": outcome.asin, "source": ctx.source, "fence": ctx.fence, "writer": ctx.worker, **values}
    if ctx.domain is not None:
        row["domain"] = ctx.domain
    if exists:
        if outcome.listing is not None:
            row["last_seen"] = ctx.now
        sets = ", ".join(f"{k} = :{k}" for k in row if k != "asin")
        return f"UPDATE deals SET {sets} WHERE asin = :asin", row
    row.setdefault("first_seen", ctx.now)
    row.setdefault("last_seen", ctx.now)
    return f"INSERT INTO deals ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})", row


@dataclass(frozen=True)
class Outcome:
    """One ASIN's result, prepared before the write transaction (evaluated, history
    compressed): storing it is only writes. `values` are the deal columns that do not depend
    on what is stored (fetch_attempts and next_retry_at do: see `store_outcomes`)."""

    asin: str
    listing: Listing | None
    status: str
    reason: str
    values: dict
    product_z: bytes | None = None  # the compressed product, None when it was not fetched
    average_cents: int | None = None

    @property
    def incomplete(self) -> bool:
        return self.status == "incomplete"


def evaluated_outcome(asin: str, listing: Listing | None, product: dict, evaluation) -> Outcome:
    """A fetched product's evaluation and compressed history (pure CPU: call it outside any
    transaction)."""
    avg = evaluation.average
    values = {
        "title": product.get("title") or (listing.title if listing else None),
        "category": product.get("rootCategory") or (listing.category if listing else None),
        "sales_rank": evaluation.sales_rank,
        "used_price_cents": evaluation.current_used_cents,
        "new_price_cents": evaluation.current_new_cents,
        "one_year_avg_cents": avg.value_cents if avg else None,
        "avg_reason": avg.reason if avg else None,
        "avg_sales": avg.sales if avg else None,
        "status": evaluation.status,
        "reason": evaluation.reason,
    }
    return Outcome(asin, listing, evaluation.status, evaluation.reason, _with_listing(values, listing),
                   compress_product(product), values["one_year_avg_cents"])


def unfetched_outcome(asin: str, listing: Listing | None, cause: str) -> Outcome:
    """A listed deal whose product could not be had (not returned, fetch kept failing):
    incomplete with its cause and a retry time, never a rejection."""
    return Outcome(asin, listing, "incomplete", cause, _with_listing({"status": "incomplete", "reason": cause}, listing))


def stored_attempts(conn, asins: list[str]) -> dict[str, int]:
    """fetch_attempts of the stored deals among `asins` (absent: not stored), in one query."""
    if not asins:
        return {}
    marks = ",".join("?" * len(asins))
    return dict(conn.execute(f"SELECT asin, fetch_attempts FROM deals WHERE asin IN ({marks})", asins).fetchall())


def store_outcomes(conn, ctx: WriteContext, outcomes: list[Outcome], retry_backoff: "RetryBackoff") -> None:
    """Write prepared outcomes: deal rows, histories, decisions. Only writes and one read.

    The retry counts (and which deals exist) are read here, inside the caller's write
    transaction, in one query: the other worker may have stored or retried the same ASIN
    since the batch was prepared, so a count read before the transaction could be stale and
    an attempt would be lost (or a row inserted twice)."""
    attempts = stored_attempts(conn, [o.asin for o in outcomes])
    deal_rows, histories, decisions = [], [], []
    for o in outcomes:
        exists = o.asin in attempts
        tries = (attempts.get(o.asin) or 0) + 1 if o.incomplete else 0
        values = {**o.values, "fetch_attempts": tries,
                  "next_retry_at": retry_backoff.next_retry_at(ctx.now, tries) if o.incomplete else None}
        if o.product_z is not None:
            values["last_fetched"] = ctx.now
            histories.append((o.asin, ctx.now, o.product_z))
        deal_rows.append(_deal_statement(ctx, o, exists, values))
        decisions.append((ctx.now, ctx.worker, o.asin, o.status, o.reason, o.average_cents, ctx.fence))
        attempts[o.asin] = tries  # the same ASIN twice in one batch: inserted once, counted twice
    for sql, group in groupby(deal_rows, key=lambda statement: statement[0]):  # in order, alike runs at once
        conn.executemany(sql, [params for _, params in group])
    conn.executemany(
        "INSERT INTO product_history (asin, fetched_at, product_z) VALUES (?, ?, ?)"
        " ON CONFLICT (asin) DO UPDATE SET fetched_at = excluded.fetched_at, product_z = excluded.product_z",
        histories,
    )
    conn.executemany(
        "INSERT INTO decisions (at, worker, asin, outcome, reason, one_year_avg_cents, fence)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        decisions,
    )


def record_evaluation(conn, ctx: WriteContext, asin: str, listing: Listing | None, product: dict,
                      evaluation, retry_backoff: "RetryBackoff") -> str:
    """One evaluated product, prepared and stored at once (admin commands; workers prepare
    a whole batch before their transaction). Returns the outcome."""
    store_outcomes(conn, ctx, [evaluated_outcome(asin, listing, product, evaluation)], retry_backoff)
    return evaluation.status


def record_unfetched(conn, ctx: WriteContext, asin: str, listing: Listing | None, cause: str,
                     retry_backoff: "RetryBackoff") -> str:
    """One product that could not be had, stored at once. Returns "incomplete"."""
    store_outcomes(conn, ctx, [unfetched_outcome(asin, listing, cause)], retry_backoff)
    return "incomplete"


def touch_seen(conn, ctx: WriteContext, listing: Listing) -> None:
    """A listed deal we fetched recently: refresh last_seen without spending a token."""
    conn.execute(
        "UPDATE deals SET last_seen = ?, deal_last_update = coalesce(?, deal_last_update) WHERE asin = ?",
        (ctx.now, listing.last_update, listing.asin),
    )


def already_current(conn, listings: list[Listing]) -> set[str]:
    """ASINs whose stored evaluation is complete and no older than the listing (Keepa's
    lastUpdate): fetching them again would spend a token for nothing. Both workers list the
    same deals; this is what keeps them from buying each product twice."""
    stamped = {l.asin: l.last_update for l in listings if l.last_update is not None}
    if not stamped:
        return set()
    marks = ",".join("?" * len(stamped))
    rows = conn.execute(
        f"SELECT asin, deal_last_update FROM deals WHERE asin IN ({marks})"
        " AND status != 'incomplete' AND last_fetched IS NOT NULL AND deal_last_update IS NOT NULL",
        tuple(stamped),
    )
    return {asin for asin, stored in rows if stored >= stamped[asin]}


@dataclass(frozen=True)
class RetryBackoff:
    """When an incomplete deal is refetched: base * 2^(attempts-1), capped. After
    `max_attempts` the retries stop (next_retry_at NULL: a product Keepa never has the history
    for would cost tokens forever); a newer listing of the deal still triggers a refetch."""

    base_s: float = 60.0
    cap_s: float = 6 * 3600.0
    max_attempts: int = 12

    def delay(self, attempts: int) -> float | None:
        if attempts >= self.max_attempts:
            return None
        return min(self.cap_s, self.base_s * (2 ** max(0, attempts - 1)))

    def next_retry_at(self, now: float, attempts: int) -> float | None:
        delay = self.delay(attempts)
        return None if delay is None else now + delay


def due_for_retry(conn, now: float, limit: int) -> list[str]:
    rows = conn.execute(
        "SELECT asin FROM deals WHERE status = 'incomplete' AND next_retry_at <= ?"
        " ORDER BY next_retry_at LIMIT ?",
        (now, limit),
    )
    return [r[0] for r in rows]


def due_for_refresh(conn, fetched_before: float, limit: int) -> list[str]:
    rows = conn.execute(
        "SELECT asin FROM deals WHERE status != 'incomplete' AND last_fetched < ?"
        " ORDER BY last_fetched LIMIT ?",
        (fetched_before, limit),
    )
    return [r[0] for r in rows]


def stored_product(conn, asin: str) -> tuple[float, dict] | None:
    row = conn.execute("SELECT fetched_at, product_z FROM product_history WHERE asin = ?", (asin,)).fetchone()
    return (row[0], decompress_product(row[1])) if row else None


def deal_counts(conn) -> dict[str, int]:
    counts = {status: 0 for status in STATUSES}
    for status, n in conn.execute("SELECT status, count(*) FROM deals GROUP BY status"):
        counts[status] = n
    return counts


def list_deals(conn, status: str | None = None, limit: int | None = None) -> list[dict]:
    sql = "SELECT * FROM deals"
    args: list[Any] = []
    if status:
        sql += " WHERE status = ?"
        args.append(status)
    sql += " ORDER BY last_seen DESC, asin"
    if limit:
        sql += " LIMIT ?"
        args.append(limit)
    out = []
    for row in conn.execute(sql, args):
        item = dict(row)
        item["one_year_avg"] = item["one_year_avg_cents"]
        out.append(item)
    return out


# ---------------------------------------------------------------- fenced commits and progress
# (checkpoints: ingest/checkpoints.py)


def note_fenced_commit(conn, ctx: WriteContext, lease: str, pid: int, what: str) -> None:
    conn.execute(
        "INSERT INTO fenced_commits (lease, fence, at, pid, what) VALUES (?, ?, ?, ?, ?)",
        (lease, ctx.fence, ctx.now, pid, what),
    )


# tokens are not among them: the ledger's call log (keepa_calls) is the one count of spending
PROGRESS_COUNTERS = ("pages", "deals_seen", "accepted", "rejected", "incomplete", "removed", "passes", "errors")


def update_progress(conn, worker: str, now: float, *, counters: dict[str, int] | None = None,
                    **fields: Any) -> None:
    """Set `fields` and add `counters` on the worker's progress row (created when missing)."""
    conn.execute(
        "INSERT INTO worker_progress (worker, state, updated_at) VALUES (?, 'starting', ?)"
        " ON CONFLICT (worker) DO NOTHING",
        (worker, now),
    )
    sets = ["updated_at = :now"]
    args: dict[str, Any] = {"worker": worker, "now": now}
    for key, value in fields.items():
        if key == "detail" and not isinstance(value, (str, type(None))):
            value = json.dumps(value, separators=(",", ":"))
        sets.append(f"{key} = :{key}")
        args[key] = value
    for key, value in (counters or {}).items():
        if key not in PROGRESS_COUNTERS:
            raise ValueError(f"unknown progress counter {key}")
        sets.append(f"{key} = {key} + :c_{key}")
        args[f"c_{key}"] = int(value)
    conn.execute(f"UPDATE worker_progress SET {', '.join(sets)} WHERE worker = :worker", args)


def progress_rows(conn) -> list[dict]:
    """Each worker's progress row; `tokens_spent` is read from the call log's running totals
    (keepa_call_totals, kept by triggers: the one record of spending, failed calls that were
    charged included), not the row's own column, and without scanning the call log."""
    rows = conn.execute(
        "SELECT p.*, (SELECT coalesce(sum(k.tokens), 0) FROM keepa_call_totals k WHERE k.worker = p.worker)"
        " AS calls_tokens FROM worker_progress p ORDER BY p.worker"
    )
    out = []
    for row in rows:
        item = dict(row)
        item["tokens_spent"] = item.pop("calls_tokens")
        out.append(item)
    return out


# ---------------------------------------------------------------- janitor


def janitor_candidates(conn, unseen_before: float, max_share: float) -> list[str]:
    """Deals unseen since `unseen_before`, at most `max_share` of the table (at least 1 when any)."""
    total = conn.execute("SELECT count(*) FROM deals").fetchone()[0]
    cap = max(1, int(total * max_share)) if total else 0
    rows = conn.execute(
        "SELECT asin FROM deals WHERE last_seen < ? ORDER BY last_seen LIMIT ?", (unseen_before, cap)
    )
    return [r[0] for r in rows]


def remove_deals(conn, ctx: WriteContext, asins: Iterable[str], reason: str) -> int:
    removed = 0
    for asin in asins:
        if conn.execute("DELETE FROM deals WHERE asin = ?", (asin,)).rowcount:
            log_decision(conn, ctx, asin, "removed", reason, None)
            removed += 1
    return removed
