"""Running one measurement in a fresh Python process (a benchmark's sides or rounds)."""

from __future__ import annotations

import json
import subprocess
from typing import Any


def run_measurement(command: list[str], what: str) -> dict[str, Any]:
    """Run `command`, whose last stdout line is one JSON object, and return that object.

    A failing child ends the benchmark with `what` and the tail of the child's stderr.
    """
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
