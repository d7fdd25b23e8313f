"""Claims on input shards, kept in the output folder: who explains what among processes that come and go.

A claim is a small JSON object ``OUT/_claims/<shard name>.claim-<generation>`` naming its owner
(host, pid, a unique token), kept in the job's output store (:mod:`eatdist.store`: a folder or
an object store URL). Rules, all built on one atomic primitive — *create an object only if that
name does not exist yet* (``link(2)`` of a finished temporary file in a folder, a conditional PUT
in a bucket):

- **claim** a free shard: create generation 0. Of several processes trying, exactly one wins.
- **heartbeat**: one thread of the owner refreshes its claims' modification times every ``lease / 6``
  seconds (``utime`` of a file, a re-PUT of an object), after checking that no generation above
  its own exists.
- **stale**: a claim is stale when its modification time is older than the lease, measured
  against the store's clock (the time of a probe object this process has just written, so
  machines whose clocks disagree still agree on ages), or — in a folder — at once when its owner
  ran on this machine (same kernel and pid namespace) and that process is gone. In an object
  store a scan reads ages from one listing and no owners (a GET per claim per scan would make
  the scan cost grow with the number of processes), so there a claim expires by its lease alone.
- **take over** a stale generation ``g``: create generation ``g + 1``. Two processes that saw the
  same stale claim cannot both win, as only one create of ``g + 1`` succeeds. The winner then checks
  that ``g`` is still exactly the file it judged stale (same mtime, same owner); if it was
  refreshed in the meantime its owner is alive, and the winner withdraws ``g + 1``. Otherwise it
  deletes ``g``. An owner that finds ``g + 1`` (or its own file gone) knows it has lost the shard
  and stops without publishing anything.
- **release**: the owner deletes its claim — after publishing the finished output, so a released
  claim always means the output exists or the shard failed. An owner that lost its claim deletes
  its own generation too (its successor has judged it already), so no claim outlives the job.

Whoever wins a claim checks that the output does not exist yet before working. The remaining
window — an owner stalled for a whole lease that wakes up between its last check and its rename —
can make two processes write the same shard; both publish complete, identical shards whole,
so the output stays correct either way.

**Object storage.** The protocol needs only a conditional create, so it maps onto stores without
rename: claim = ``PUT _claims/<name>.claim-<g>`` with ``If-None-Match: *`` (S3) or
``ifGenerationMatch=0`` (GCS), failing with 412 when taken; heartbeat = a re-``PUT`` of the same
bytes after checking that the object and no successor exist (a heartbeat racing a takeover may
put back a generation its successor just removed: the owner then finds the successor, knows it
lost and deletes its own again); age = the store's ``Last-Modified`` (one-second resolution, so a
lease is at least a few seconds) against that of a probe object just written; outputs are single
``PUT``s, which appear whole, so no temporary name is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from eatdist.store import Store, open_store
from eatdist.store.local import LocalStore

CLAIMS = "_claims"
_SEP = ".claim-"


def _machine() -> str:
    """Identify this kernel and pid namespace: pids are comparable only within one."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _start_time(pid: int) -> str | None:
    """Return the kernel's start time of ``pid`` (tells a reused pid apart), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _process_gone(pid: int, start: str | None) -> bool:
    """Return True when ``pid`` has exited (or is a zombie, or is another process now)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X") or (start is not None and _start_time(pid) not in (None, start))


@dataclass(frozen=True)
class Owner:
    """One process taking part in a job."""

    host: str
    pid: int
    token: str
    machine: str
    start: str | None

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:12], _machine(), _start_time(os.getpid()))

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid}"

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "token": self.token, "machine": self.machine, "start": self.start}


@dataclass(frozen=True)
class ClaimState:
    """The current claim on one shard, as one scan saw it."""

    name: str
    generation: int
    key: str
    mtime_ns: int
    owner: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.owner.get('host', '?')}:{self.owner.get('pid', '?')}"


class ClaimBoard:
    """The claims of one output store (a folder, a path or a store), seen from one process."""

    def __init__(self, out: str | Path | Store, lease_s: float, owner: Owner | None = None) -> None:
        self.store = out if isinstance(out, Store) else open_store(out)
        self.lease_s = lease_s
        self.owner = owner or Owner.me()
        self._probe = f"{CLAIMS}/.clock-{self.owner.token}"
        self.reads_owners = isinstance(self.store, LocalStore)
        self.heartbeats = _Heartbeats(max(0.05, lease_s / 6), f"claim-heartbeats-{self.owner.token}")
        if isinstance(self.store, LocalStore):  # other tools (and people) find the folder from the start
            self.store.file(CLAIMS).mkdir(parents=True, exist_ok=True)

    def key(self, name: str, generation: int) -> str:
        return f"{CLAIMS}/{name}{_SEP}{generation}"

    def path(self, name: str, generation: int) -> Path:
        """Return the local file of a claim (a folder store only)."""
        if not isinstance(self.store, LocalStore):
            raise TypeError(f"claims in {self.store.root} are objects, not local files")
        return self.store.file(self.key(name, generation))

    def now(self) -> float:
        """Return the store's current time (seconds), read from a probe object written just now."""
        return self.store.now(self._probe)

    def scan(self, owners: bool | None = None) -> dict[str, ClaimState]:
        """Return the current (highest-generation) claim of every claimed shard.

        Ages come from one listing. Owners are read (a GET per claim) with ``owners``, by default
        only in a folder, where a claim of a dead process on this machine is stale at once; in an
        object store a claim expires by its lease alone, so a scan costs one listing however
        many processes hold claims (``owner`` is then ``{}``).
        """
        owners = self.reads_owners if owners is None else owners
        latest: dict[str, tuple[int, int]] = {}
        for entry, stamp in self.store.list_times(CLAIMS).items():
            name, sep, gen = entry.rpartition(_SEP)
            if sep and gen.isdigit() and int(gen) > latest.get(name, (-1, 0))[0]:
                latest[name] = (int(gen), stamp)
        states = {}
        for name, (gen, stamp) in latest.items():
            state = self.read(name, gen) if owners else ClaimState(name, gen, self.key(name, gen), stamp, {})
            if state is not None:
                states[name] = state
        return states

    def _mtime_now(self, name: str, generation: int) -> int | None:
        """Return the claim's modification time as a scan sees it (the same source, so comparable)."""
        if self.reads_owners:
            state = self.read(name, generation)
            return None if state is None else state.mtime_ns
        return self.store.list_times(CLAIMS).get(f"{name}{_SEP}{generation}")

    def read(self, name: str, generation: int) -> ClaimState | None:
        """Return the claim's state, or None when it no longer exists."""
        key = self.key(name, generation)
        mtime = self.store.mtime_ns(key)
        try:
            data = self.store.get(key)
        except FileNotFoundError:
            return None
        if mtime is None:
            return None
        try:
            owner = json.loads(data)["owner"]
        except (ValueError, KeyError, TypeError):  # being written (O_EXCL fallback): live until it ages
            owner = {}
        return ClaimState(name, generation, key, mtime, owner)

    def age(self, state: ClaimState, now: float) -> float:
        """Seconds since ``state``'s last heartbeat, on the store's clock."""
        return max(0.0, now - state.mtime_ns / 1e9)

    def is_stale(self, state: ClaimState, now: float) -> bool:
        """Return True when the claim's owner has stopped: no heartbeat for a lease, or gone from this machine."""
        if self.age(state, now) > self.lease_s:
            return True
        owner = state.owner
        if owner.get("machine") == self.owner.machine and isinstance(owner.get("pid"), int):
            return owner["pid"] != os.getpid() and _process_gone(owner["pid"], owner.get("start"))
        return False

    def try_claim(self, name: str, seen: ClaimState | None, input_url: str) -> Claim | None:
        """Claim ``name`` if free (``seen`` None) or take over the stale claim ``seen``; None if another won."""
        generation = 0 if seen is None else seen.generation + 1
        key = self.key(name, generation)
        record = json.dumps({"owner": self.owner.to_json(), "input": input_url, "claimed_at": time.time()}).encode()
        if not self.store.create(key, record):
            return None
        if seen is not None:
            # Is the claim we replace still exactly the stale one we saw? A heartbeat since then
            # means its owner lives: withdraw. Deleting it tells that owner, should it wake, it lost.
            # A claim released since (gone) was live too.
            again = self.read(name, seen.generation) if seen.owner else None
            stamp = again.mtime_ns if again is not None else self._mtime_now(name, seen.generation)
            if stamp != seen.mtime_ns or (again is not None and again.owner != seen.owner):
                self.store.delete(key)
                return None
            self.store.delete(seen.key)
        return Claim(self, name, generation, record)

    def close(self) -> None:
        """Stop the heartbeat thread and drop this process's clock probe."""
        self.heartbeats.close()
        self.store.delete(self._probe)


class _Heartbeats:
    """One thread that keeps the heartbeat of every claim a board holds open.

    A thread per claim would cost a start and a join on every shard: milliseconds each where the
    cores are busy with the forward, as a new thread must be scheduled before ``start`` returns.
    This one starts with the first claim opened and ends at a beat that finds none open, or at
    :meth:`close`.
    """

    def __init__(self, interval_s: float, name: str) -> None:
        self.interval_s, self.name = interval_s, name
        self._open: dict[int, Claim] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, claim: Claim) -> None:
        with self._lock:
            self._open[id(claim)] = claim
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def remove(self, claim: Claim) -> None:
        with self._lock:
            self._open.pop(id(claim), None)

    def close(self) -> None:
        """Stop the thread (claims still open are no longer refreshed)."""
        self._closed.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while not self._closed.wait(self.interval_s):
            with self._lock:
                claims = list(self._open.values())
                if not claims:  # under the lock: a claim opened from now on starts a new thread
                    self._thread = None
                    return
            for claim in claims:
                claim.beat()


class Claim:
    """A claim this process holds; its board's heartbeat thread refreshes it while it is open."""

    def __init__(self, board: ClaimBoard, name: str, generation: int, record: bytes = b"{}") -> None:
        self.board, self.name, self.generation = board, name, generation
        self.key = board.key(name, generation)
        self._record = record
        self._beating = threading.Lock()  # a beat and the release never overlap
        self._stopped = False
        self._lost = threading.Event()

    @property
    def path(self) -> Path:
        return self.board.path(self.name, self.generation)

    def __enter__(self) -> Claim:
        self.board.heartbeats.add(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def beat(self) -> None:
        """Refresh the claim's modification time, or mark it lost when another process has taken it over."""
        with self._beating:
            if self._stopped or self._lost.is_set():
                return
            try:
                if not self.held() or not self.board.store.touch(self.key, self._record):
                    self._lost.set()
            except Exception:  # a store that fails for a while: the next beat tries again, the lease decides
                pass

    @property
    def lost(self) -> bool:
        """True once the heartbeat has found the claim taken over (cheap: no store access)."""
        return self._lost.is_set()

    def held(self) -> bool:
        """Return True while no other process has taken this claim over."""
        if self._lost.is_set():
            return False
        store = self.board.store
        return store.exists(self.key) and not store.exists(self.board.key(self.name, self.generation + 1))

    def release(self) -> None:
        """Stop the heartbeat and delete the claim (also when lost: its successor has judged it already).
        Waits for a beat under way, so none can put the claim back once it is deleted."""
        self.board.heartbeats.remove(self)
        with self._beating:
            self._stopped = True
        self.board.store.delete(self.key)
