"""A driver <-> worker pipe that crosses machines through torch.distributed's TCP store, and a stand-in for the
process on the other side.

The executor talks to a local worker through a multiprocessing pipe and watches its process sentinel. For a
worker on another node the same roles are played by a StoreLink (the pipe: messages ride the store's queues,
one per direction and worker) and a RemoteProcess (the sentinel: its node's agent reports the exit code), so
the executor's wait on "any pipe or sentinel ready" covers both. Store payloads are capped (8 MiB), so a message
travels as frames; a receiving thread reassembles each one into a local pipe, whose file descriptor is what the
executor waits on. The store orders the pushes of one connection, not of two: a worker's queues have one
sender each (a CLOSE from another only ends them); a node's queue has several, and one-frame messages only.
"""

from __future__ import annotations

import datetime
import os
import threading
import weakref
from multiprocessing import Pipe

import torch.distributed as dist

from remp.multinode.protocol import link_queues

FRAME = 4 << 20  # under the store's 8 MiB payload limit
MORE, LAST, CLOSE = b"\0", b"\1", b"\2"
# A blocking pop ends by a CLOSE frame or a lost connection; its timeout only bounds one wait (a pop that times
# out is retried). Kept well under 2**31 ms: the store's socket waits overflow beyond that.
WAIT = datetime.timedelta(hours=1)


def send_framed(store: dist.Store, key: str, data: bytes) -> None:
    for i in range(0, max(len(data), 1), FRAME):
        store.queue_push(key, (LAST if i + FRAME >= len(data) else MORE) + data[i : i + FRAME])


def pump(store: dist.Store, key: str, deliver, on_end) -> threading.Thread:
    """A thread that pops `key`'s frames, hands each whole message to deliver(bytes) and calls on_end() when a
    CLOSE frame comes or the store connection is lost (the other side is gone)."""

    def run() -> None:
        parts: list[bytes] = []
        try:
            while True:
                try:
                    frame = store.queue_pop(key)
                except dist.DistStoreError:  # nothing within WAIT: wait again
                    continue
                if frame[:1] == CLOSE:
                    return
                parts.append(frame[1:])
                if frame[:1] == LAST:
                    deliver(b"".join(parts))
                    parts = []
        except (dist.DistError, OSError):  # the store's server is gone: so is the other side
            return
        finally:
            on_end()

    thread = threading.Thread(target=run, name=f"remp-link-{key}", daemon=True)
    thread.start()
    return thread


def blocking_client(store: dist.TCPStore) -> dist.TCPStore:
    """A connection of its own (a blocking pop holds it)."""
    client = store.clone()
    client.set_timeout(WAIT)
    return client


class StoreLink:
    """Driver side of a remote worker's pipe: send_bytes / recv_bytes / poll / fileno / close, as a Connection."""

    def __init__(self, store: dist.TCPStore, wid: int):
        self.down, self.up = link_queues(wid)
        self._send_store, self._lock = store.clone(), threading.Lock()
        self._reader, writer = Pipe(duplex=False)
        # at the end the executor reads EOF: the worker is gone
        self._thread = pump(blocking_client(store), self.up, writer.send_bytes, writer.close)
        self._wake = store.clone()

    def send_bytes(self, data: bytes) -> None:
        with self._lock:
            try:
                send_framed(self._send_store, self.down, data)
            except dist.DistError as e:
                raise OSError(f"store link {self.down}: {e}") from None

    def recv_bytes(self) -> bytes:
        return self._reader.recv_bytes()

    def poll(self, timeout: float = 0.0) -> bool:
        return self._reader.poll(timeout)

    def fileno(self) -> int:
        return self._reader.fileno()

    def close(self) -> None:
        if self._reader.closed:
            return
        try:
            self._wake.queue_push(self.up, CLOSE)  # ends our receiving thread
        except dist.DistError:
            pass
        self._thread.join(2.0)
        self._reader.close()


class RemoteProcess:
    """Stand-in for a worker process on another node: what the executor uses of multiprocessing.Process. Its
    node's agent reports the exit (exited()); kill() asks the agent and, since a lost node never answers,
    counts the worker as gone at once."""

    def __init__(self, wid: int, node: int, kill_fn):
        self.wid, self.node, self._kill_fn = wid, node, kill_fn
        self.exitcode: int | None = None
        self.pid: int | None = None  # on its own machine
        self._r, self._w = os.pipe()
        self._done = threading.Event()
        weakref.finalize(self, _close_fds, self._r, self._w)

    @property
    def sentinel(self) -> int:
        return self._r

    def exited(self, code: int) -> None:
        if self._done.is_set():
            return
        self.exitcode = code
        self._done.set()
        os.write(self._w, b"x")

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def kill(self) -> None:
        try:
            self._kill_fn(self.wid)
        finally:
            self.exited(-9)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
