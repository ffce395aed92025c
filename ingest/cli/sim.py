"""`ingest sim`: run the Keepa-compatible simulator in the foreground."""

import logging
import signal
import sys
import threading

import click

from ..errors import EXIT_USAGE, IngestError
from ..logs import register_secret, setup_logging


class UsageLine(IngestError):
    """A bad flag: reported as one line (not click's usage block), exit 2."""

    exit_code = EXIT_USAGE


class OneLineUsageCommand(click.Command):
    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise UsageLine(f"{info_name}: {e.format_message()}") from None


def _share(ctx, param, value):
    if value is not None and not 0.0 <= value <= 1.0:
        raise click.BadParameter("must be a share between 0 and 1")
    return value


def _pair(kind_a, kind_b, label):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            a, b = value.split(":")
            pair = (kind_a(a), kind_b(b))
        except ValueError:
            raise click.BadParameter(f"expected {label}") from None
        if pair[0] < 0 or pair[1] < 0:
            raise click.BadParameter(f"expected {label}, both >= 0")
        return pair

    return parse


def _keys(ctx, param, value):
    if value is None:
        return None
    keys = tuple(k.strip() for k in value.split(",") if k.strip())
    for key in keys:
        register_secret(key)
    return keys


@click.command("sim", cls=OneLineUsageCommand)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0 = any free port; the URL printed says which).")
@click.option("--refill-rate", default=300, show_default=True, type=click.IntRange(0, 10**6),
              help="Tokens added per minute (one tick a minute); the cap is 60 x this.")
@click.option("--start-tokens", type=click.IntRange(-10**9, 10**9), default=None, help="Balance at start (may be negative). [default: the cap]")
@click.option("--token-flow-reduction", type=click.FloatRange(0, 10**6), default=0.0, show_default=True,
              help="Value reported as tokenFlowReduction in every envelope.")
@click.option("--seed", default=1, show_default=True, type=click.IntRange(0, 2**63 - 1), help="Catalogue and fault seed (same seed, same products).")
@click.option("--products", default=5000, show_default=True, type=click.IntRange(1, 10_000_000),
              help="Catalogue size (products are generated lazily).")
@click.option("--keys", default=None, metavar="K1,K2",
              help="Accepted API keys, comma separated. [default: any non-empty key]", callback=_keys)
@click.option("--expired-keys", default=None, metavar="K1,K2", callback=_keys,
              help="Keys answered with 402 (expired / no access).")
@click.option("--fault-500", type=float, default=0.0, show_default=True, callback=_share, metavar="P",
              help="Share of calls answered 500 (cost 0).")
@click.option("--fault-slow", type=float, default=0.0, show_default=True, callback=_share, metavar="P",
              help="Share of calls answered after --slow-s (charged).")
@click.option("--slow-s", type=click.FloatRange(0), default=2.0, show_default=True, help="Delay of a slow answer.")
@click.option("--fault-timeout", type=float, default=0.0, show_default=True, callback=_share, metavar="P",
              help="Share of calls processed and charged but held for --timeout-s (the client times out).")
@click.option("--timeout-s", type=click.FloatRange(0), default=30.0, show_default=True,
              help="How long a timed-out answer is held.")
@click.option("--fault-malformed", type=float, default=0.0, show_default=True, callback=_share, metavar="P",
              help="Share of calls answered 200 with a truncated JSON body (charged).")
@click.option("--fault-no-history", type=float, default=0.0, show_default=True, callback=_share, metavar="P",
              help="Share of products returned with csv and stats null (charged).")
@click.option("--fault-drip", type=float, default=0.0, show_default=True, callback=_share, metavar="P",
              help="Share of calls whose body trickles out over --drip-s (charged).")
@click.option("--drip-s", type=click.FloatRange(0, 3600), default=60.0, show_default=True,
              help="How long a drip-fed body takes (longer than the client's deadline_s).")
@click.option("--fault-redirect", type=float, default=0.0, show_default=True, callback=_share, metavar="P",
              help="Share of calls answered 302 to --redirect-to, another host (cost 0).")
@click.option("--redirect-to", default="http://127.0.0.2:9/elsewhere", show_default=True, metavar="URL",
              help="Where the redirect fault points.")
@click.option("--force-429", default=None, metavar="START:DURATION", callback=_pair(float, float, "START:DURATION seconds"),
              help="Refuse every call with 429 from START to START+DURATION seconds after start.")
@click.option("--force-402", default=None, metavar="START:DURATION", callback=_pair(float, float, "START:DURATION seconds"),
              help="Answer every call (/token too) with 402 from START to START+DURATION seconds after start.")
@click.option("--rate-change", default=None, metavar="AT:RATE", callback=_pair(float, int, "AT_SECONDS:RATE"),
              help="Change the refill rate to RATE at AT seconds after start.")
@click.option("--deal-updates-per-min", type=click.FloatRange(0.001), default=30.0, show_default=True,
              help="About how many listed deals get a new lastUpdate per minute.")
@click.option("--deal-new-per-min", type=click.FloatRange(0.001), default=2.0, show_default=True,
              help="About how many products become deal-listed per minute after start.")
@click.option("--deal-share", type=float, default=0.6, show_default=True, callback=_share, metavar="P",
              help="Share of the catalogue that is ever deal-listed.")
@click.option("--deal-cache-s", type=click.FloatRange(0), default=120.0, show_default=True,
              help="How long a deal query's result list is cached (Keepa: about 120 s).")
@click.option("--verbose", "-v", is_flag=True, help="Log every request (keys redacted) on stderr.")
def sim_command(verbose, **options):
    """Run a Keepa-compatible API server (tokens, deals, products, faults) until SIGTERM/SIGINT.

    Prints its base URL on the first line of stdout. Point a Keepa client at it (e.g.
    KEEPA_BASE_URL=<url>). Admin endpoints: GET /_sim/stats, GET|POST /_sim/faults,
    GET|POST /_sim/tokens (see docs/simulator.md).
    """
    from ..simulator import SimConfig, Simulator

    setup_logging("sim", logging.DEBUG if verbose else logging.INFO)
    cfg = SimConfig(
        host=options["host"], port=options["port"], refill_rate=options["refill_rate"],
        start_tokens=options["start_tokens"], token_flow_reduction=options["token_flow_reduction"],
        seed=options["seed"], products=options["products"], api_keys=options["keys"],
        expired_keys=options["expired_keys"] or (), fault_500=options["fault_500"],
        fault_slow=options["fault_slow"], slow_s=options["slow_s"], fault_timeout=options["fault_timeout"],
        timeout_s=options["timeout_s"], fault_malformed=options["fault_malformed"],
        fault_no_history=options["fault_no_history"], fault_drip=options["fault_drip"], drip_s=options["drip_s"],
        fault_redirect=options["fault_redirect"], redirect_to=options["redirect_to"],
        force_429_window=options["force_429"],
        force_402_window=options["force_402"],
        rate_change=options["rate_change"], deal_update_per_min=options["deal_updates_per_min"],
        deal_new_per_min=options["deal_new_per_min"], deal_share=options["deal_share"],
        deal_cache_s=options["deal_cache_s"],
    )
    try:
        cfg.validate()
        sim = Simulator(cfg).start()
    except ValueError as e:
        raise UsageLine(f"sim: {e}") from None
    except OSError as e:
        raise IngestError(f"sim: cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(sim.url)
    sys.stdout.flush()
    logging.getLogger("ingest.simulator").info(
        "serving %s: %d products, refill %d/min, seed %d", sim.url, cfg.products, cfg.refill_rate, cfg.seed)
    while not stop.wait(0.5):
        pass
    sim.stop()


commands = [sim_command]
