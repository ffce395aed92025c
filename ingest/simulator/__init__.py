"""A local Keepa-compatible API server: Keepa's token model, a deterministic catalogue with
realistic histories, deal pages that move with time, and fault injection. See docs/simulator.md.

    from ingest.simulator import SimConfig, Simulator
    with Simulator(SimConfig(refill_rate=300)) as sim:
        requests.get(f"{sim.url}/token", params={"key": "any"})
"""

from .config import SimConfig, keepa_minute, unix_seconds
from .server import Simulator

__all__ = ["SimConfig", "Simulator", "keepa_minute", "unix_seconds"]
