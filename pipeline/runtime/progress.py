"""The driver's progress line: what a log reader needs, every ``LATENTSHIFT_PROGRESS_SECONDS`` (10 s).

  latentshift translate  3/16 shards, 120 samples (4.2/s), 0 rejected, ETA 3m10s

Printed where Ray's progress bars are off (no terminal, runtime/ray_env.py): a pod's, a CI job's or a
scheduled run's log gets a line every few seconds instead of hundreds of Ray's. In a terminal Ray's bars
show and this stays silent. The ETA is the remaining shards at the rate shards have committed so far.
"""

from __future__ import annotations

import os
import time


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(self, job: str, shards: int, out, every: float | None = None, clock=time.monotonic):
        from pipeline.runtime.ray_env import interactive

        self.job, self.total, self.out, self.clock = job, shards, out, clock
        env = os.environ.get("LATENTSHIFT_PROGRESS_SECONDS")
        self.every = every if every is not None else float(env) if env else 10.0
        self.on = self.every > 0 and not interactive()
        self.started = self.last = clock()
        self.shards = self.samples = self.rejected = 0

    def add(self, samples: int = 0, rejected: int = 0, shards: int = 0) -> None:
        self.samples += samples
        self.rejected += rejected
        self.shards += shards
        now = self.clock()
        if self.on and now - self.last >= self.every:
            self.last = now
            self.out.write(self.line(now) + "\n")
            self.out.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        if self.shards and self.shards < self.total:
            eta = f"ETA {_duration(elapsed / self.shards * (self.total - self.shards))}"
        else:
            eta = "ETA ?" if not self.shards else "finishing"
        return (f"latentshift {self.job}  {self.shards}/{self.total} shards, {self.samples} samples "
                f"({self.samples / elapsed:.1f}/s), {self.rejected} rejected, {eta}")
