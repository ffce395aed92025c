"""Learned token costs per kind of call, from what the server actually charged (tokensConsumed).

Per unit (a deal page, an ASIN) we keep an exponentially weighted average and the latest samples;
a reservation uses the higher of the average and the 90th percentile of the samples, so a costly
minority (offers, products Keepa refreshes) is reserved for instead of discovered as a deficit.
Until a kind has samples, the documented price is the prior.
"""

import json
import math

ALPHA = 0.2
KEEP_SAMPLES = 50
PERCENTILE = 0.9
FLOOR_SHARE_OF_PRIOR = 0.25
PRIORS = {"deal": 5.0, "product": 1.0, "token": 0.0}


def product_kind(offers: int | None) -> str:
    """Offers change the price per ASIN (6 per page of 10 offers): learn them separately."""
    return "product" if not offers else f"product:offers={int(offers)}"


def prior(kind: str) -> float:
    if kind.startswith("product:offers="):
        offers = int(kind.split("=", 1)[1])
        return 6.0 * math.ceil(min(max(offers, 1), 100) / 10)
    return PRIORS.get(kind, 1.0)


def unit_cost(conn, account: str, kind: str) -> float:
    row = conn.execute(
        "SELECT avg, samples FROM token_costs WHERE account = ? AND kind = ?", (account, kind)
    ).fetchone()
    if row is None:
        return prior(kind)
    samples = sorted(json.loads(row["samples"]))
    high = samples[min(int(PERCENTILE * len(samples)), len(samples) - 1)] if samples else 0.0
    # a run of ASINs Keepa did not find (free) must not teach the ledger that products are free
    return max(row["avg"], high, FLOOR_SHARE_OF_PRIOR * prior(kind))


def estimate_cost(conn, account: str, kind: str, units: int) -> float:
    """Tokens to reserve for `units` of `kind` (whole tokens: Keepa charges integers)."""
    if units <= 0:
        return 0.0
    return float(max(math.ceil(units * unit_cost(conn, account, kind) - 1e-9), 1 if kind != "token" else 0))


def learn_cost(conn, account: str, kind: str, per_unit: float, now: float) -> None:
    """Fold one observation in; call inside the settling transaction."""
    row = conn.execute(
        "SELECT avg, samples, n FROM token_costs WHERE account = ? AND kind = ?", (account, kind)
    ).fetchone()
    if row is None:
        avg, samples, n = per_unit, [per_unit], 1
    else:
        avg = (1 - ALPHA) * row["avg"] + ALPHA * per_unit
        samples = (json.loads(row["samples"]) + [per_unit])[-KEEP_SAMPLES:]
        n = row["n"] + 1
    conn.execute(
        "INSERT INTO token_costs (account, kind, avg, samples, n, updated_at) VALUES (?,?,?,?,?,?)"
        " ON CONFLICT (account, kind) DO UPDATE SET avg = excluded.avg, samples = excluded.samples,"
        " n = excluded.n, updated_at = excluded.updated_at",
        (account, kind, avg, json.dumps([round(s, 4) for s in samples]), n, now),
    )


def learned(conn, account: str) -> list[dict]:
    rows = conn.execute(
        "SELECT kind, avg, samples, n, updated_at FROM token_costs WHERE account = ? ORDER BY kind", (account,)
    ).fetchall()
    return [
        {"kind": r["kind"], "avg": round(r["avg"], 3), "reserve_per_unit": round(unit_cost(conn, account, r["kind"]), 3),
         "samples": r["n"], "updated_at": r["updated_at"]}
        for r in rows
    ]
