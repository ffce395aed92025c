"""Every bench script runs from a checkout as the README says (`.venv/bin/python bench/X.py`):
nothing in bench/ may shadow the ingest package, and each script's imports resolve."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_no_bench_file_is_named_like_the_package():
    assert not (ROOT / "bench" / "ingest.py").exists()
    assert not (ROOT / "bench" / "ingest").exists()


def test_the_bench_scripts_are_found():
    assert {p.name for p in SCRIPTS} >= {"analytics.py", "chaos.py", "diagnostics.py", "leases.py", "ledger.py",
                                         "throughput.py", "tokens.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_help_exits_0_from_the_repo_root(script):
    done = subprocess.run([sys.executable, str(script.relative_to(ROOT)), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
