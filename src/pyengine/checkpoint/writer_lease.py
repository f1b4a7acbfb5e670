"""One writer per object-store prefix: a lease object taken and renewed with conditional PUTs.

    PREFIX/.pyengine-writer.lease    JSON: the holder's identity (host, boot, PID namespace,
                                     PID, start time), a random owner id, the lease length

Taking it: PUT with `If-None-Match: *` (only if absent). When another holder's lease is
there, it is taken over with `If-Match: <its ETag>` (only if unchanged since read) once that
holder is known dead: it ran on this machine and its process is gone (process_identity.py;
then after a short grace for the requests it had sent, DEAD_WRITER_GRACE_SECONDS),
or the lease has not been renewed for `lease_seconds` by the server's clock (its Date against
the object's Last-Modified, so no two machines' clocks are compared). A Checkpointer's first
try waits up to `lease_seconds` for that; a lease that is renewed meanwhile belongs to a
live writer, and saves are refused (the object store can still be read). The holder renews
it every quarter of `lease_seconds` on a thread, and again, synchronously, right before each
commit marker is written: a writer whose lease was taken over never commits again.

What this does not do: fence. A holder that stalls for longer than `lease_seconds` between
that last renewal and its marker PUT (a suspended VM) may commit once more after a takeover.
The server must honour conditional PUTs (AWS S3 since 2024, SeaweedFS, MinIO do); one that
ignores them lets a second writer in, as with no lock.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from typing import Any

from pyengine.checkpoint.object_store import S3Store
from pyengine.checkpoint.process_identity import ProcessIdentity
from pyengine.errors import CheckpointError

LEASE_NAME = ".pyengine-writer.lease"
# A request a writer had sent in full before it was killed is still carried out by the server
# (the kernel delivers what its socket held): a marker or a completed upload may appear a moment
# after the writer is gone. A takeover waits this long first, so that its clean-up comes after
# them. This narrows the window, it cannot close it (a CompleteMultipartUpload may take longer);
# what lands later is either harmless (objects without a marker, removed by the next clean-up)
# or a marker whose CRCs do not match the shards the new writer wrote: restore then fails
# verification, warns and falls back to an older step. It never loads torn data.
DEAD_WRITER_GRACE_SECONDS = 0.5
_FORMAT = "pyengine.writer-lease"


class WriterLease:
    """The Checkpointer's writer lock on an object-store prefix (the interface of
    directory.WriterLock: try_acquire, held, release), plus confirm() before a commit.

    Concurrency: the training thread calls try_acquire/release, the commit thread confirm,
    and one renewal thread runs while the lease is held; a lock orders their PUTs."""

    def __init__(self, store: S3Store, lease_seconds: float) -> None:
        self._store = store
        self._seconds = float(lease_seconds)
        self._owner = uuid.uuid4().hex
        self._me = ProcessIdentity.current()
        self._etag: str | None = None
        self._lost: str | None = None
        self._waited = False
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._etag is not None

    def try_acquire(self) -> bool:
        """Takes the lease if it is free or its holder is dead; the first call waits up to
        lease_seconds to tell a dead holder elsewhere from a live one, later calls do not."""
        if self._etag is not None:
            return True
        etag = self._store.put(LEASE_NAME, self._record(), if_none_match=True)
        deadline = time.monotonic() + (0.0 if self._waited else self._seconds + 2.0)
        self._waited = True
        seen: str | None = None
        while etag is None:
            current = self._store.get(LEASE_NAME)
            if current is None:  # released meanwhile
                etag = self._store.put(LEASE_NAME, self._record(), if_none_match=True)
                continue
            data, current_etag, age = current
            holder = _parse(data)
            if holder.get("owner") == self._owner:  # our own PUT, answered 412 when retried
                etag = current_etag
            elif _is_stale(holder, age, self._seconds):
                if age <= self._seconds:  # its process just died: let the requests it sent land first
                    time.sleep(DEAD_WRITER_GRACE_SECONDS)
                etag = self._store.put(LEASE_NAME, self._record(), if_match=current_etag)
                if etag is None:
                    continue  # someone else changed it first: look again
            elif (seen is not None and current_etag != seen) or time.monotonic() >= deadline:
                return False  # renewed while we watched: a live writer holds it
            else:
                seen = current_etag
                time.sleep(min(1.0, self._seconds / 8))
        self._etag = etag
        self._lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="pyengine-s3-lease", daemon=True)
        self._thread.start()
        return True

    def confirm(self) -> None:
        """Renews the lease now; raises CheckpointError if this writer no longer holds it."""
        with self._mutex:
            if self._etag is None or self._lost is not None:
                raise CheckpointError(self._lost_message())
            self._renew_locked()
            if self._lost is not None:
                raise CheckpointError(self._lost_message())

    def release(self) -> None:
        """Stops renewing and deletes the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self._etag is None:
                return
            self._etag = None
            try:
                current = self._store.get(LEASE_NAME)
                if current is not None and _parse(current[0]).get("owner") == self._owner:
                    self._store.delete([LEASE_NAME])
            except OSError:
                pass  # a lease left behind expires after lease_seconds; it is never wrong to leave it

    # ------------------------------------------------------------------------------ renewal

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._seconds / 4):
            with self._mutex:
                if self._etag is None or self._lost is not None:
                    return
                with contextlib.suppress(OSError):  # retried next period; confirm() raises if it keeps failing
                    self._renew_locked()

    def _renew_locked(self) -> None:
        etag = self._store.put(LEASE_NAME, self._record(), if_match=self._etag)
        if etag is None:
            current = self._store.get(LEASE_NAME)
            holder = _parse(current[0]) if current is not None else {}
            if holder.get("owner") == self._owner and current is not None:  # our retried PUT
                self._etag = current[1]
                return
            who = holder.get("holder", {})
            self._lost = (f"host {who.get('host', '?')} pid {who.get('pid', '?')}" if holder
                          else "nobody (the lease object was deleted)")
            return
        self._etag = etag

    def _lost_message(self) -> str:
        return (f"this process no longer holds the writer lease of {self._store.url} (now held by "
                f"{self._lost or 'nobody'}): another Checkpointer took over, so this one may not commit. "
                "Nothing was committed; keep one writer per prefix")

    def _record(self) -> bytes:
        return json.dumps({"format": _FORMAT, "owner": self._owner, "holder": self._me.to_json(),
                           "lease_seconds": self._seconds, "renewed_unix": time.time()}).encode()


def _parse(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) and doc.get("format") == _FORMAT else {}


def _is_stale(holder: dict[str, Any], age_seconds: float, our_seconds: float) -> bool:
    """Its holder is dead: not renewed within its own lease length (ours for an unreadable
    record), or recorded by a process of this machine that no longer exists."""
    seconds = holder.get("lease_seconds", our_seconds)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0:
        seconds = our_seconds
    if age_seconds > seconds:
        return True
    identity = ProcessIdentity.from_json(holder.get("holder"))
    return identity is not None and identity.is_dead_here()
