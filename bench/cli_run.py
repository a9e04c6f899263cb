"""Run chatsmith commands from a benchmark: the one helper the bench scripts share."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

PY = [sys.executable, "-m", "chatsmith"]


def sh(*args, log: Path) -> float:
    """Run a chatsmith command, its output to `log`; -> seconds. A failure stops the benchmark."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run([*PY, *map(str, args)], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): chatsmith {' '.join(map(str, args))}; see {log}")
    return time.perf_counter() - t0
