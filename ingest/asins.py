"""ASINs: ten characters, A-Z and 0-9 (ISBN-10s are ASINs too: 0439064872), compared upper-case.

Checked wherever one enters: Keepa's /deal and /product lists (keepa.py drops an entry without a
valid one, and says how many in one line) and CLI arguments (`asin_argument`, a click type).
"""

import re

import click

_ASIN = re.compile(r"[A-Z0-9]{10}")


def is_asin(value) -> bool:
    """A well-formed ASIN as stored (upper-case text)."""
    return isinstance(value, str) and _ASIN.fullmatch(value) is not None


def parse_asin(text: str) -> str:
    """The ASIN `text` names, upper-cased (lookup is case-insensitive), or ValueError with a
    line that shows at most the first 20 characters."""
    candidate = text.strip().upper() if isinstance(text, str) else ""
    if not _ASIN.fullmatch(candidate):
        shown = text if isinstance(text, str) and len(text) <= 20 else f"{str(text)[:17]}..."
        raise ValueError(f"{shown!r} is not an ASIN (10 letters or digits, e.g. B00EXAMPLE)")
    return candidate


class AsinType(click.ParamType):
    name = "ASIN"

    def convert(self, value, param, ctx):
        try:
            return parse_asin(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


asin_argument = AsinType()
