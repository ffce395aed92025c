"""`ingest diagnose asin ASIN`: why a deal got its outcome, step by step.

From the stored product history (zero tokens), the 1yr average is recomputed with
`analytics.explain` at the moment the product was fetched, so it reproduces the stored
decision; a difference means the analytics settings changed since (run `ingest deals
recompute`). `--fetch` asks Keepa afresh through the token ledger and reports what it cost;
the fresh product is shown, not stored (storing is the workers' job, under their lease).
"""

from datetime import datetime, timezone

from .analytics import AnalyticsParams, explain
from .deals import stored_product
from .errors import IngestError


class UnknownAsin(IngestError):
    """Not in the deals table, or no stored history to explain from."""


def _deal_row(conn, asin: str) -> dict | None:
    row = conn.execute("SELECT * FROM deals WHERE asin = ?", (asin,)).fetchone()
    return dict(row) if row else None


def _decisions(conn, asin: str, limit: int = 10) -> list[dict]:
    rows = conn.execute(
        "SELECT at, worker, outcome, reason, one_year_avg_cents, fence FROM decisions WHERE asin = ?"
        " ORDER BY id DESC LIMIT ?",
        (asin, limit),
    )
    return [dict(r) for r in rows]


def _compare(stored: dict | None, steps: dict) -> dict | None:
    """Does the recomputed outcome match what is stored?"""
    if stored is None:
        return None
    recomputed = (steps["evaluation"]["status"], steps["evaluation"]["reason"], steps["result"]["value_cents"])
    kept = (stored["status"], stored["reason"], stored["one_year_avg_cents"])
    return {"matches": recomputed == kept, "stored": dict(zip(("status", "reason", "one_year_avg_cents"), kept)),
            "recomputed": dict(zip(("status", "reason", "one_year_avg_cents"), recomputed))}


def explain_stored(conn, asin: str, params: AnalyticsParams) -> dict:
    """The explanation from stored history. UnknownAsin (one line) when there is nothing to explain."""
    asin = asin.strip().upper()
    deal = _deal_row(conn, asin)
    stored = stored_product(conn, asin)
    if stored is None:
        if deal is None:
            raise UnknownAsin(f"{asin}: unknown ASIN (not in the deals table)")
        raise UnknownAsin(f"{asin}: no stored history ({deal['status']}: {deal['reason']}); "
                          "use --fetch to ask Keepa (costs tokens)")
    fetched_at, product = stored
    steps = explain(product, datetime.fromtimestamp(fetched_at, tz=timezone.utc), params)
    return {
        "asin": asin,
        "source": "stored",
        "fetched_at": fetched_at,
        "tokens": 0,
        "deal": deal,
        "steps": steps,
        "comparison": _compare(deal, steps),
        "decisions": _decisions(conn, asin),
    }


def explain_fetched(conn, asin: str, params: AnalyticsParams, keepa, now: float) -> dict:
    """Fetch the product afresh through `keepa` (a MeteredKeepa: ledger-reserved, logged) and explain it."""
    asin = asin.strip().upper()
    estimate = keepa.ledger.estimate("product", 1)
    page = keepa.products([asin], stats=365, history=True)
    envelope = page.envelope
    product = next((p for p in page.products if isinstance(p, dict) and str(p.get("asin", "")).upper() == asin), None)
    cost = {"estimated": estimate, "tokens_consumed": envelope.tokens_consumed, "tokens_left": envelope.tokens_left,
            "latency_ms": round(envelope.latency_s * 1000, 1)}
    if product is None:
        raise UnknownAsin(f"{asin}: Keepa returned no product (cost {envelope.tokens_consumed} tokens)")
    steps = explain(product, datetime.fromtimestamp(now, tz=timezone.utc), params)
    deal = _deal_row(conn, asin)
    return {
        "asin": asin,
        "source": "fetched",
        "fetched_at": now,
        "tokens": envelope.tokens_consumed,
        "cost": cost,
        "deal": deal,
        "steps": steps,
        "comparison": _compare(deal, steps),
        "decisions": _decisions(conn, asin),
    }


# ------------------------------------------------------------------ text


def _money(cents) -> str:
    return "-" if cents is None else f"${cents / 100:.2f}"


def render(report: dict) -> list[str]:
    """The report as lines for a terminal."""
    steps, lines = report["steps"], []
    deal = report["deal"]
    source = ("stored history, fetched " + _when(report["fetched_at"]) + " (0 tokens)"
              if report["source"] == "stored" else
              f"fetched now: {report['cost']['tokens_consumed']} tokens"
              f" (estimated {report['cost']['estimated']:g}, {report['cost']['tokens_left']} left)")
    lines.append(f"{report['asin']}  {(deal or {}).get('title') or ''}".rstrip())
    lines.append(f"source: {source}")
    if deal:
        lines.append(f"stored: {deal['status']} ({deal['reason']}), 1yr avg {_money(deal['one_year_avg_cents'])},"
                     f" first seen {_when(deal['first_seen'])}, last seen {_when(deal['last_seen'])}")
    h = steps["history"]
    lines.append("")
    lines.append(f"1. history: tracked since {h['tracking_since'] or '?'} ({h['tracked_days']} days)"
                 + ("" if h["csv_present"] else ": NO csv (history missing from the fetch)"))
    slots = h["slots"]
    for name in ("count_used", "sales_rank"):
        lines.append(f"   {name}: {_span(slots[name])}")
    for i, s in enumerate(slots["used_price"]):
        lines.append(f"   used_price[{i}]: {_span(s)}")
    sales = steps["sales"]
    in_window = [s for s in sales if s["in_window"]]
    lines.append(f"2. sales inferred: {len(sales)} ({len(in_window)} in the window"
                 f" {steps['result']['window_start'][:10]} .. {steps['result']['window_end'][:10]})")
    for s in in_window:
        lines.append(f"   {s['time'][:16]}  {_money(s['price_cents']):>9}  (rank improved {s['confirmed_at'][:16]})")
    if len(sales) > len(in_window):
        lines.append(f"   ({len(sales) - len(in_window)} earlier sale(s) outside the window: --json lists them)")
    if steps["unconfirmed_drops"]:
        lines.append(f"   {len(steps['unconfirmed_drops'])} used-count drop(s) without a rank improvement: not sales")
    lines.append(f"3. outliers removed: {', '.join(map(_money, steps['outliers_removed'])) or 'none'}")
    r = steps["result"]
    lines.append(f"4. 1yr average: {_money(r['value_cents'])} ({r['reason']}, median of {r['sales']} sale(s))"
                 + (f"; missing: {', '.join(r['missing'])}" if r["missing"] else ""))
    e = steps["evaluation"]
    share = 100 - e["min_discount_pct"]
    limit = f" = {_money(int(r['value_cents'] * share / 100))}" if r["value_cents"] is not None else ""
    lines.append(f"5. decision: {e['status']} ({e['reason']}); used now {_money(e['current_used_cents'])},"
                 f" accepted at <= {share:g}% of the average{limit}; sales rank {e['sales_rank'] or '-'}")
    comparison = report["comparison"]
    if comparison and not comparison["matches"]:
        lines.append("   differs from the stored outcome "
                     f"({comparison['stored']['status']} {comparison['stored']['reason']}): analytics settings"
                     " changed since, or the data did; `ingest deals recompute` applies today's rules")
    if report["decisions"]:
        lines.append("decisions (newest first):")
        for d in report["decisions"]:
            lines.append(f"   {_when(d['at'])}  {d['worker']:<9} {d['outcome']:<10} {d['reason']}")
    return lines


def _when(ts) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _span(s: dict) -> str:
    if not s["points"]:
        return "no data"
    return f"{s['points']} points, {s['first'][:10]} .. {s['last'][:10]}, last {s['last_value']}" + (
        f", {s['no_data_points']} no-data" if s["no_data_points"] else "")
