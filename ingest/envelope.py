"""What a server may send, bounded: JSON parsed without unbounded numbers or nesting, and the
token numbers of a Keepa envelope checked against Keepa's model before they reach the ledger.

Pure functions, no I/O. A server (Keepa, a proxy, a look-alike) can send anything:
- `parse_json(text)` refuses NaN/Infinity, numbers too long to be meaningful and nesting deeper
  than MAX_DEPTH, as a `problem` line, never an exception;
- `token_problem(fields, received_at)` names the first token number outside the model
  (refillIn at most a minute, refillRate positive and bounded, tokensLeft a bounded integer ...),
  or returns None. The client ignores an envelope with a problem for the ledger (keepa.py).
"""

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 64            # a Keepa body nests about 6 deep
MAX_INT_DIGITS = 20       # a 64-bit integer has at most 19 digits (and a sign)
MAX_FLOAT_CHARS = 40

# Keepa's token model (see /work/shared/keepa-api.md): refill once a minute, the balance capped
# at 60 x refillRate; the bounds are generous but keep every later computation finite and sane.
MAX_REFILL_IN_MS = 60_000
MAX_REFILL_RATE = 100_000          # tokens per minute (the largest plans are a few thousand)
MAX_ABS_TOKENS = 60 * MAX_REFILL_RATE * 10
MAX_CONSUMED = 1_000_000
MAX_CLOCK_SKEW_S = 10 * 365 * 86_400  # server timestamp vs our clock: absurd values, not skew


class Unacceptable(ValueError):
    """A JSON token outside the bounds (raised inside json.loads, turned into a problem line)."""


@dataclass(frozen=True)
class Parsed:
    body: dict
    problem: str | None = None   # None: `body` is the JSON object the server sent


def _constant(name: str):
    raise Unacceptable(f"non-finite number {name}")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise Unacceptable(f"an integer of {len(text)} digits")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_FLOAT_CHARS:
        raise Unacceptable(f"a number of {len(text)} characters")
    value = float(text)
    if not math.isfinite(value):
        raise Unacceptable("a number out of range")
    return value


def loads(text: str | bytes) -> Any:
    """json.loads with bounded numbers (Unacceptable, a ValueError) and no stack exhaustion
    (deep nesting is Unacceptable too)."""
    try:
        return json.loads(text, parse_constant=_constant, parse_int=_int, parse_float=_float)
    except RecursionError:
        raise Unacceptable(f"JSON nested deeper than {MAX_DEPTH} levels") from None


def parse_json(text: str, *, max_depth: int = MAX_DEPTH) -> Parsed:
    """The JSON object in `text`, or a one-line problem. Nesting beyond the interpreter's
    recursion limit is stopped by the C parser's own guard (RecursionError, caught in `loads`);
    beyond `max_depth`, by an iterative walk of the parsed value."""
    try:
        body = loads(text)
    except Unacceptable as e:
        return Parsed({}, f"not acceptable JSON: {e}")
    except ValueError:
        return Parsed({}, "not JSON")
    if not isinstance(body, dict):
        return Parsed({}, "JSON but not an object")
    if _deeper_than(body, max_depth):
        return Parsed({}, f"not acceptable JSON: nested deeper than {max_depth} levels")
    return Parsed(body)


def _deeper_than(value: Any, limit: int) -> bool:
    """Is any container of `value` more than `limit` levels deep? Iterative (an explicit stack)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


# ---------------------------------------------------------------- the token envelope


@dataclass(frozen=True)
class TokenFields:
    """The envelope's numbers as the server sent them (None: absent or not a number)."""

    tokens_left: float | None = None
    refill_in_ms: float | None = None
    refill_rate: float | None = None
    flow_reduction: float | None = None
    tokens_consumed: float | None = None
    timestamp_ms: float | None = None


def token_problem(fields: TokenFields, received_at: float) -> str | None:
    """The first token number outside Keepa's model, as one line naming the field, or None."""
    checks = (
        ("tokensLeft", fields.tokens_left, lambda v: _whole(v) and abs(v) <= MAX_ABS_TOKENS),
        ("refillIn", fields.refill_in_ms, lambda v: 0 <= v <= MAX_REFILL_IN_MS),
        ("refillRate", fields.refill_rate, lambda v: 0 < v <= MAX_REFILL_RATE),
        ("tokenFlowReduction", fields.flow_reduction, lambda v: 0 <= v <= MAX_REFILL_RATE),
        ("tokensConsumed", fields.tokens_consumed, lambda v: _whole(v) and 0 <= v <= MAX_CONSUMED),
        ("timestamp", fields.timestamp_ms,
         lambda v: abs(v / 1000 - received_at) <= MAX_CLOCK_SKEW_S if received_at else v >= 0),
    )
    for name, value, sane in checks:
        if value is None:
            continue
        if not math.isfinite(value) or not sane(value):
            return f"{name} {_shown(value)} is outside Keepa's model"
    return None


def _whole(value: float) -> bool:
    return float(value).is_integer()


def _shown(value: float) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else text[:21] + "..."
