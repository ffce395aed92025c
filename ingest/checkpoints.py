"""The workers' checkpoints as typed records: the backfill cursor and the upsert watermark.

Each is stored as one JSON object in the `checkpoints` table (name 'backfill' / 'upsert'),
saved in the same fenced transaction as the rows it covers. `from_json` accepts every shape
stored so far (missing keys take their defaults), so databases written by older versions load.

Backfill cursor:
  {"query": fingerprint, "pass": n, "page": p, "pass_started_at": t,
   "pending": [listing, ...] | null,  # the page's deals not yet stored; null = fetch page p
   "last_page": bool,                 # page p was shorter than a full page: the pass ends after it
   "next_pass_at": t | null,          # pause between passes
   "last_complete_pass_started_at": t | null}   # the janitor trusts only complete passes

Upsert watermark:
  {"watermark": keepa_minute | null, "at_watermark": [asin, ...],   # stored at exactly that minute
   "pending": [listing, ...], "next_poll_at": t}
"""

import json
from dataclasses import dataclass, replace

from .deals import Listing, WriteContext

BACKFILL = "backfill"
UPSERT = "upsert"


def _listings(data) -> tuple[Listing, ...]:
    return tuple(Listing.from_json(item) for item in data or ())


@dataclass(frozen=True)
class BackfillCursor:
    query: str | None = None
    pass_number: int = 0  # "pass" in JSON
    page: int = 0
    pass_started_at: float | None = None
    pending: tuple[Listing, ...] | None = None
    last_page: bool = False
    next_pass_at: float | None = None
    last_complete_pass_started_at: float | None = None

    name = BACKFILL

    def between_passes(self, now: float) -> bool:
        """Legitimately idle: the pause after a complete pass has not ended yet."""
        return bool(self.next_pass_at) and now < self.next_pass_at

    def pending_count(self) -> int:
        return len(self.pending or ())

    def to_json(self) -> dict:
        return {
            "query": self.query,
            "pass": self.pass_number,
            "page": self.page,
            "pass_started_at": self.pass_started_at,
            "pending": None if self.pending is None else [l.to_json() for l in self.pending],
            "last_page": self.last_page,
            "next_pass_at": self.next_pass_at,
            "last_complete_pass_started_at": self.last_complete_pass_started_at,
        }

    @classmethod
    def from_json(cls, data: dict) -> "BackfillCursor":
        pending = data.get("pending")
        return cls(
            query=data.get("query"),
            pass_number=int(data.get("pass") or 0),
            page=int(data.get("page") or 0),
            pass_started_at=data.get("pass_started_at"),
            pending=None if pending is None else _listings(pending),
            last_page=bool(data.get("last_page")),
            next_pass_at=data.get("next_pass_at"),
            last_complete_pass_started_at=data.get("last_complete_pass_started_at"),
        )


@dataclass(frozen=True)
class UpsertWatermark:
    watermark: int | None = None  # Keepa minutes
    at_watermark: tuple[str, ...] = ()  # ASINs stored at exactly that minute
    pending: tuple[Listing, ...] = ()
    next_poll_at: float = 0.0

    name = UPSERT

    def advance(self, stored) -> "UpsertWatermark":
        """The watermark moved to the newest of `stored` (all older than what is pending)."""
        watermark, at = self.watermark, list(self.at_watermark)
        for listing in stored:
            stamp = listing.last_update or 0
            if watermark is None or stamp > watermark:
                watermark, at = stamp, [listing.asin]
            elif stamp == watermark and listing.asin not in at:
                at.append(listing.asin)
        return replace(self, watermark=watermark, at_watermark=tuple(at))

    def to_json(self) -> dict:
        return {
            "watermark": self.watermark,
            "at_watermark": list(self.at_watermark),
            "pending": [l.to_json() for l in self.pending],
            "next_poll_at": self.next_poll_at,
        }

    @classmethod
    def from_json(cls, data: dict) -> "UpsertWatermark":
        return cls(
            watermark=data.get("watermark"),
            at_watermark=tuple(data.get("at_watermark") or ()),
            pending=_listings(data.get("pending")),
            next_poll_at=float(data.get("next_poll_at") or 0),
        )


Checkpoint = BackfillCursor | UpsertWatermark


def load_backfill(conn) -> BackfillCursor | None:
    data = _load(conn, BACKFILL)
    return None if data is None else BackfillCursor.from_json(data)


def load_upsert(conn) -> UpsertWatermark | None:
    data = _load(conn, UPSERT)
    return None if data is None else UpsertWatermark.from_json(data)


def _load(conn, name: str) -> dict | None:
    row = conn.execute("SELECT value FROM checkpoints WHERE name = ?", (name,)).fetchone()
    return json.loads(row[0]) if row else None


def save(conn, ctx: WriteContext, checkpoint: Checkpoint) -> None:
    """Inside the caller's fenced transaction."""
    conn.execute(
        "INSERT INTO checkpoints (name, value, updated_at, fence) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at,"
        " fence = excluded.fence",
        (checkpoint.name, json.dumps(checkpoint.to_json(), separators=(",", ":")), ctx.now, ctx.fence),
    )
