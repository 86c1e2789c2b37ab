"""Shard claims: overlapping runs on one output prefix share its shards instead of redoing them.

  _leases/<run>.json             a live run's heartbeat, renewed by its driver (``keep_alive``)
  _claims/<shard>/<n>.json       generation n of the shard's claim: which run is doing it

The shard's claim is its highest generation. It is live while its run is: the run's lease
exists and has not expired, or — when the run is on this same machine — its driver process
still exists. To claim a shard, a run creates the next generation with an exclusive create
(``OutputStore.create``: link(2) locally, ``If-None-Match: *`` on S3), so of two runs racing
for a shard exactly one wins. A killed run stops renewing; once its lease expires (or at once,
on its own machine) the next run takes its shards over with the next generation and removes
its staging.

Claims keep runs from doing the same work and from deleting each other's staging. They are
not what makes outputs exactly-once: a shard's outputs are whole files replaced at once, with
the ledger record written last (``pipeline/data/ledger.py``). A run that loses a claim while it
still works (its lease expired: a host paused for longer than ``output.lease_seconds``) has its
commit refused, so the shard is written once, by the run that holds it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.data.outputs import OutputStore

log = logging.getLogger(__name__)


def machine() -> str:
    """This machine as pid numbers see it: host name, kernel boot and pid namespace. Two drivers
    with the same value see each other's processes, so a gone pid means a dead run."""
    def read(path: str, how) -> str:
        try:
            return how(path).strip()
        except OSError:  # not Linux: the host name alone
            return ""

    return "/".join((socket.gethostname(), read("/proc/sys/kernel/random/boot_id", lambda p: open(p).read()),
                     read("/proc/self/ns/pid", os.readlink)))


def process_started(pid: int) -> float | None:
    """When process ``pid`` started (so a reused pid is not mistaken for it); None if there is none."""
    import psutil  # a dependency of Ray

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def generation(name: str) -> int | None:
    """``<n>.json`` → n; None for any other name under _claims/ (a temp file, say)."""
    stem = name[: -len(".json")] if name.endswith(".json") else ""
    return int(stem) if stem.isdigit() else None


@dataclass
class Claims:
    """One run's side of the claims under ``store``; picklable, so readers on workers claim too."""

    store: OutputStore
    run_id: str
    lease_seconds: float = 300.0

    # ---- this run's lease ------------------------------------------------------------
    def renew(self) -> None:
        now, pid = time.time(), os.getpid()
        self.store.put_json(self.store.lease(self.run_id), {
            "run_id": self.run_id, "machine": machine(), "pid": pid, "pid_started": process_started(pid),
            "renewed_at": now, "expires_at": now + self.lease_seconds})

    def end(self) -> None:
        """The run is over: its lease goes, and with it the control folders the run left empty
        (``_leases/`` among them, unless another run's lease is in it)."""
        self.store.remove(self.store.lease(self.run_id))
        self.store.remove_empty_control_folders()

    def alive(self, run_id: str) -> bool:
        """Is run ``run_id`` still running (as far as its lease tells)?"""
        if run_id == self.run_id:
            return True
        try:
            lease = self.store.get_json(self.store.lease(run_id))
        except (FileNotFoundError, ValueError):  # no lease (ended) or a damaged one
            return False
        if lease.get("machine") == machine() and process_started(int(lease["pid"])) != lease.get("pid_started"):
            return False  # its driver is gone from this machine: no need to wait for the lease to run out
        return time.time() < float(lease["expires_at"])

    # ---- shard claims ----------------------------------------------------------------
    def _generations(self, shard: str) -> list[int]:
        found = (generation(posixpath.basename(p)) for p in self.store.find(self.store.claims(shard)))
        return sorted(g for g in found if g is not None)

    def _read(self, shard: str, generation: int) -> dict:
        try:
            return self.store.get_json(posixpath.join(self.store.claims(shard), f"{generation}.json"))
        except (FileNotFoundError, ValueError):  # released meanwhile, or damaged
            return {}

    def _top_run(self, shard: str, gens: list[int] | None = None) -> str | None:
        """The run named by the shard's highest claim generation, alive or not; None if unclaimed."""
        gens = self._generations(shard) if gens is None else gens
        return self._read(shard, gens[-1]).get("run_id") if gens else None

    def holder(self, shard: str) -> str | None:
        """The run that holds the shard now, or None (unclaimed, or its run is dead)."""
        run = self._top_run(shard)
        return run if run and self.alive(run) else None

    def take(self, shard: str) -> bool:
        """Claim ``shard`` for this run; False if another live run holds it."""
        for _ in range(5):  # a lost race is looked at again: the winner may be dead already
            gens = self._generations(shard)
            nxt = 0
            if gens:
                top = self._top_run(shard, gens)
                if top == self.run_id:
                    return True
                if top is not None and self.alive(top):
                    return False
                nxt = gens[-1] + 1
            nonce = uuid.uuid4().hex
            body = json.dumps({"run_id": self.run_id, "nonce": nonce, "claimed_at": time.time()}).encode()
            path = posixpath.join(self.store.claims(shard), f"{nxt}.json")
            if self.store.create(path, body) or self._read(shard, nxt).get("nonce") == nonce:
                return True  # (the second: our PUT landed, and its retry was refused)
        return False

    def holds(self, shard: str) -> bool:
        return self._top_run(shard) == self.run_id

    def release(self, shard: str) -> None:
        """Give the shard up (committed, or left undone), if this run holds it."""
        gens = self._generations(shard)
        if gens:
            self._release(shard, gens)

    def _release(self, shard: str, gens: list[int]) -> None:
        """Highest generation first, so a run that looks meanwhile never sees an older, dead
        generation on top of a live one it would then overwrite."""
        if self._top_run(shard, gens) == self.run_id:
            for g in reversed(gens):
                self.store.remove(posixpath.join(self.store.claims(shard), f"{g}.json"))
            self.store.remove_empty_folder(self.store.claims(shard))

    def _all(self) -> dict[str, list[int]]:
        """Every shard with a claim: its generations, from one listing of _claims/."""
        root, gens = self.store.claims(), {}
        for p in self.store.find(root):
            shard, name = posixpath.split(posixpath.relpath(p, root))
            if (g := generation(name)) is not None:
                gens.setdefault(shard, []).append(g)
        return {shard: sorted(g) for shard, g in gens.items()}

    def release_all(self, shards: Iterable[str]) -> None:
        """``release`` each of ``shards`` this run still holds (one listing, not one per shard)."""
        claimed = self._all()
        for shard in shards:
            if shard in claimed:
                self._release(shard, claimed[shard])

    def held_elsewhere(self, shards: Iterable[str]) -> dict[str, str]:
        """Of ``shards``, those another live run holds now: {shard: run id}. One listing of _claims/,
        then the claimed shards' top generations read in parallel (one GET each; a run start with
        thousands of claimed shards on S3 waits for the slowest, not for their sum)."""
        claimed = self._all()
        todo = [s for s in shards if s in claimed]
        if not todo:
            return {}
        with ThreadPoolExecutor(min(16, len(todo)), thread_name_prefix="latentshift-claims") as pool:
            tops = dict(zip(todo, pool.map(lambda s: self._top_run(s, claimed[s]), todo), strict=True))
        live = {r for r in set(tops.values()) if r and r != self.run_id and self.alive(r)}
        return {shard: run for shard, run in tops.items() if run in live}

    def dead_runs(self, run_ids: Iterable[str]) -> list[str]:
        return [r for r in run_ids if not self.alive(r)]


@contextmanager
def keep_alive(claims: Claims) -> Iterator[Claims]:
    """Hold this run's lease for the block: written now, renewed every quarter of its length by a
    daemon thread, removed at the end. A renewal that fails is logged and tried again."""
    claims.renew()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(claims.lease_seconds / 4):
            try:
                claims.renew()
            except Exception as exc:  # noqa: BLE001 - the next beat tries again; expiry is the backstop
                log.warning("could not renew the lease of run %s: %s", claims.run_id, exc)

    thread = threading.Thread(target=beat, name="latentshift-lease", daemon=True)
    thread.start()
    try:
        yield claims
    finally:
        stop.set()
        thread.join()
        claims.end()
