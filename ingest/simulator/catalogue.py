"""A deterministic catalogue: product i is a pure function of (seed, i, anchor).

Nothing is generated up front: a product's profile (title, category, price levels, deal
schedule) comes from a `random.Random` seeded with the string f"{seed}/{i}/..." (string seeds
are hashed with SHA-512, so they do not depend on PYTHONHASHSEED), and ASINs map to indices
by an invertible affine map, so start-up is instant whatever the catalogue size.
"""

import random
import threading
from dataclasses import dataclass

BOOKS = 283155
# (root category, share, {sub category id: name}); books dominate, as in the deployment.
ROOTS = [
    (BOOKS, "Books", 0.85, {1: "Arts & Photography", 2: "Biographies & Memoirs", 3: "Business & Money",
                            4: "Children's Books", 5: "Computers & Technology", 6: "Cookbooks",
                            9: "History", 17: "Literature & Fiction", 18: "Mystery, Thriller & Suspense",
                            25: "Science Fiction & Fantasy", 75: "Science & Math"}),
    (172282, "Electronics", 0.04, {281407: "Accessories & Supplies", 502394: "Camera & Photo"}),
    (1055398, "Home & Kitchen", 0.04, {284507: "Kitchen & Dining", 1063498: "Home Décor"}),
    (165793011, "Toys & Games", 0.03, {166220011: "Puzzles", 166057011: "Games"}),
    (468642, "Video Games", 0.02, {6427814011: "Nintendo Switch"}),
    (2625373011, "Movies & TV", 0.02, {2649512011: "Movies"}),
]
CATEGORY_NAMES = {root: name for root, name, _share, _subs in ROOTS}
for _root, _name, _share, _subs in ROOTS:
    CATEGORY_NAMES.update(_subs)

_ADJ = ["Silent", "Hidden", "Last", "Broken", "Golden", "Quiet", "Lost", "Northern", "Secret", "Burning",
        "Practical", "Complete", "Little", "Wild", "Forgotten", "Modern", "Essential", "Dark", "Bright"]
_NOUN = ["River", "Garden", "Empire", "Winter", "Kitchen", "Algorithm", "Harbor", "Mountain", "Letters",
         "Orchard", "Lighthouse", "Machine", "Atlas", "Detective", "Voyage", "Forest", "Kingdom", "Bridge"]
_KIND = ["A Novel", "A Memoir", "A Guide", "Stories", "A History", "Second Edition", "Book 2", "A Thriller"]
_THING = ["USB-C Cable", "Chef Knife", "Jigsaw Puzzle", "Board Game", "Desk Lamp", "Blu-ray", "Controller"]

# Kinds of history, with their shares (the rest is "normal").
KIND_SHARES = [("new", 0.06), ("no_sales", 0.08), ("gappy", 0.10)]

_ASIN_MOD_B = 36 ** 8
_ASIN_MOD_N = 10 ** 9
_ASIN_MUL = 2_654_435_761  # odd and not a multiple of 3 or 5: invertible modulo 36^8 and 10^9
_B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MINUTES_PER_DAY = 1440


@dataclass(frozen=True)
class DealSchedule:
    """When a product is deal-listed: updates at start + floor(k * period) for k = 0, 1, ...
    up to `end` (None = forever). Keepa minutes."""

    start: int
    period: float
    end: int | None
    new_drops: bool  # the NEW price drops too (so priceTypes=1 queries find it)

    def updates_until(self, now_km: int) -> int:
        """How many updates have happened by now_km (0 = not listed yet)."""
        last = now_km if self.end is None else min(now_km, self.end)
        if last < self.start:
            return 0
        return int((last - self.start) // self.period) + 1

    def update_time(self, k: int) -> int:
        return self.start + int(k * self.period)


@dataclass(frozen=True)
class Profile:
    index: int
    asin: str
    title: str
    root: int
    categories: tuple[int, ...]
    kind: str  # normal | new | no_sales | gappy
    shipping: bool  # has used-condition shipping triplets (slots 19-22, 32)
    amazon: bool  # Amazon itself sells it (slot 0)
    tracking_since: int  # Keepa minutes
    listed_since: int
    base_used: int  # cents
    base_new: int
    base_rank: int
    base_count_used: int
    base_count_new: int
    sales_per_30d: float
    rating: int  # 0..50, -1 = none
    reviews: int
    image: str
    deal: DealSchedule | None

    @property
    def history_end(self) -> int:
        """Where the generated (pre-simulation) history stops; deal updates follow it."""
        return min(self.deal.start, self.tracking_end) if self.deal else self.tracking_end

    tracking_end: int = 0


class Catalogue:
    def __init__(self, seed: int, products: int, anchor_km: int, deal_share: float = 0.6,
                 deal_update_per_min: float = 30.0, deal_new_per_min: float = 2.0):
        self.seed = seed
        self.size = products
        self.anchor_km = anchor_km
        self.deal_share = deal_share
        listed = max(1.0, products * deal_share)
        # Mean update period so that about deal_update_per_min listed deals update per minute.
        self.mean_period = max(1.0, listed / deal_update_per_min)
        # 30% of listed products join after start, spread so about deal_new_per_min join a minute.
        self.future_horizon = max(1.0, listed * 0.3 / deal_new_per_min)
        self._asin_off_b = (seed * 7_919_191 + 12_345) % _ASIN_MOD_B
        self._asin_off_n = (seed * 104_729 + 54_321) % _ASIN_MOD_N
        self._inv_b = pow(_ASIN_MUL, -1, _ASIN_MOD_B)
        self._inv_n = pow(_ASIN_MUL, -1, _ASIN_MOD_N)
        self._profiles: dict[int, Profile] = {}
        self._lock = threading.Lock()
        self._deal_indices: list[int] | None = None

    def rng(self, index: int, tag: str) -> random.Random:
        return random.Random(f"{self.seed}/{index}/{tag}")

    # -- ASINs -------------------------------------------------------------------------------

    def _is_book(self, index: int) -> bool:
        return self.rng(index, "c").random() < ROOTS[0][2]

    def asin_of(self, index: int) -> str:
        if self._is_book(index):  # ISBN-10 style: digits, often a leading zero
            n = (index * _ASIN_MUL + self._asin_off_n) % _ASIN_MOD_N
            return f"0{n:09d}"
        n = (index * _ASIN_MUL + self._asin_off_b) % _ASIN_MOD_B
        digits = []
        for _ in range(8):
            n, r = divmod(n, 36)
            digits.append(_B36[r])
        return "B0" + "".join(reversed(digits))

    def index_of(self, asin: str) -> int | None:
        asin = asin.upper()
        if len(asin) != 10:
            return None
        if asin[0] == "0" and asin.isdigit():
            index = ((int(asin[1:]) - self._asin_off_n) * self._inv_n) % _ASIN_MOD_N
        elif asin.startswith("B0") and asin.isalnum():
            index = ((int(asin[2:], 36) - self._asin_off_b) * self._inv_b) % _ASIN_MOD_B
        else:
            return None
        if index >= self.size or self.asin_of(index) != asin:
            return None
        return index

    # -- profiles ----------------------------------------------------------------------------

    def profile(self, index: int) -> Profile:
        cached = self._profiles.get(index)
        if cached is None:
            cached = self._make_profile(index)
            with self._lock:
                if len(self._profiles) > 200_000:
                    self._profiles.clear()
                self._profiles[index] = cached
        return cached

    def _make_profile(self, index: int) -> Profile:
        r = self.rng(index, "p")
        root, subs = self._category(index)
        sub = r.choice(sorted(subs))
        kind = "normal"
        roll = r.random()
        for name, share in KIND_SHARES:
            if roll < share:
                kind = name
                break
            roll -= share
        if kind == "new":
            tracking_since = self.anchor_km - int(r.uniform(7, 60) * MINUTES_PER_DAY)
        else:
            tracking_since = self.anchor_km - int(r.uniform(2.6, 3.2) * 365 * MINUTES_PER_DAY)
        base_used = int(r.lognormvariate(7.0, 0.6))  # ~ $11 median
        base_rank = int(10 ** r.uniform(3.0, 6.4))
        sales = 0.0 if kind == "no_sales" else min(30.0, max(0.1, 200_000 / base_rank))
        book = root == BOOKS
        return Profile(
            index=index,
            asin=self.asin_of(index),
            title=self._title(r, book),
            root=root,
            categories=(sub,),
            kind=kind,
            shipping=r.random() < 0.25,
            amazon=r.random() < 0.3,
            tracking_since=tracking_since,
            listed_since=tracking_since - r.randint(0, 400 * MINUTES_PER_DAY),
            base_used=max(99, base_used),
            base_new=max(199, int(base_used * r.uniform(1.2, 2.5))),
            base_rank=base_rank,
            base_count_used=r.randint(2, 40),
            base_count_new=r.randint(1, 30),
            sales_per_30d=sales,
            rating=r.choice([-1, 35, 40, 42, 45, 47, 50]),
            reviews=r.randint(0, 5000),
            image="".join(r.choice(_B36 + "abcdefghijklmnopqrstuvwxyz") for _ in range(11)) + ".jpg",
            deal=self._deal_schedule(index),
            tracking_end=self.anchor_km,
        )

    def _category(self, index: int) -> tuple[int, dict]:
        roll = self.rng(index, "c").random()
        for root, _name, share, subs in ROOTS:
            if roll < share:
                return root, subs
            roll -= share
        return ROOTS[-1][0], ROOTS[-1][3]

    @staticmethod
    def _title(r: random.Random, book: bool) -> str:
        if book:
            return f"The {r.choice(_ADJ)} {r.choice(_NOUN)}: {r.choice(_KIND)}"
        return f"{r.choice(_ADJ)} {r.choice(_THING)} ({r.randint(1, 9) * 10} pack)"

    def _deal_schedule(self, index: int) -> DealSchedule | None:
        r = self.rng(index, "d")
        if r.random() >= self.deal_share:
            return None
        period = max(1.0, self.mean_period * r.uniform(0.5, 1.5))
        if r.random() < 0.7:  # already listed at start, first seen up to 11 h ago
            start = self.anchor_km - int(r.uniform(0, 11 * 60))
        else:
            start = self.anchor_km + int(r.uniform(1, self.future_horizon))
        end = start + int(r.uniform(60, 720)) if r.random() < 0.2 else None
        return DealSchedule(start=start, period=period, end=end, new_drops=r.random() < 0.4)

    def deal_indices(self) -> list[int]:
        """Indices of products that are ever deal-listed (computed once, cheap rolls only)."""
        if self._deal_indices is None:
            self._deal_indices = [i for i in range(self.size) if self.rng(i, "d").random() < self.deal_share]
        return self._deal_indices
