"""Where a model stage's time goes, batch by batch: device work vs host work (for ``latentshift bench``).

Off unless ``$LATENTSHIFT_PROFILE`` names a local folder; then every model-stage actor appends
one JSON line per batch (and one when its models are loaded) to ``<folder>/<pid>.jsonl``.
Wall-clock times (``time.time()``) so that lines from several processes share one axis.
Writing a line is microseconds and happens after the batch's device work, outside its lock.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

ENV = "LATENTSHIFT_PROFILE"


class StageProfile:
    def __init__(self, stage: str):
        folder = os.environ.get(ENV, "").strip()
        self.stage = stage
        self.path = Path(folder) / f"{os.getpid()}.jsonl" if folder else None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def record(self, event: str, **fields) -> None:
        if self.path is None:
            return
        line = json.dumps({"event": event, "stage": self.stage, "pid": os.getpid(), **fields})
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")


def read_profile(folder: str | Path) -> list[dict]:
    """Every line the actors wrote, sorted by start time."""
    lines = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        lines += [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
    return sorted(lines, key=lambda r: r.get("start", 0.0))


def now() -> float:
    return time.time()
