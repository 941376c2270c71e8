"""Shared test setup: tests import small on-disk factories from tests/."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# Ray (Flower's simulation runtime) must not try to reach anything outside this machine.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
