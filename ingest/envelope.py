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
MAX_ABS_INT = 10**MAX_INT_DIGITS
_SCALARS = frozenset({int, float, str, bool, type(None)})

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


def _float(text: str) -> float:
    if len(text) > MAX_FLOAT_CHARS:
        raise Unacceptable(f"a number of {len(text)} characters")
    value = float(text)
    if not math.isfinite(value):
        raise Unacceptable("a number out of range")
    return value


def loads(text: str | bytes) -> Any:
    """json.loads without NaN/Infinity or floats out of range (Unacceptable, a ValueError), and
    without stack exhaustion (nesting past the interpreter's recursion limit is Unacceptable).
    Integers and depth below that are checked on the parsed value by `unbounded`."""
    try:
        return json.loads(text, parse_constant=_constant, parse_float=_float)
    except RecursionError:
        raise Unacceptable(f"JSON nested deeper than {MAX_DEPTH} levels") from None


def parse_json(text: str, *, max_depth: int = MAX_DEPTH) -> Parsed:
    """The JSON object in `text`, or a one-line problem."""
    try:
        body = loads(text)
    except Unacceptable as e:
        return Parsed({}, f"not acceptable JSON: {e}")
    except ValueError:
        return Parsed({}, "not JSON")
    if not isinstance(body, dict):
        return Parsed({}, "JSON but not an object")
    problem = unbounded(body, max_depth)
    if problem is not None:
        return Parsed({}, f"not acceptable JSON: {problem}")
    return Parsed(body)


def unbounded(value: Any, max_depth: int = MAX_DEPTH) -> str | None:
    """What makes a parsed JSON value unsafe to compute with: nesting deeper than `max_depth`, or
    an integer of more than MAX_INT_DIGITS digits; None when it is fine. Iterative (an explicit
    stack), and the long lists of numbers a Keepa product holds are checked at C speed (a hook
    per integer inside json.loads would double the parse time)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return f"nested deeper than {max_depth} levels"
        children = list(item.values()) if isinstance(item, dict) else item if isinstance(item, list) else []
        kinds = set(map(type, children))
        if int in kinds:
            ints = children if len(kinds) == 1 else [c for c in children if type(c) is int]
            if max(ints) >= MAX_ABS_INT or min(ints) <= -MAX_ABS_INT:
                return f"an integer of more than {MAX_INT_DIGITS} digits"
        if kinds <= _SCALARS:
            continue
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return None


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
