"""Forward stabilize's recorded events to snapshotd over its Unix socket.

stabilize's EventRecorder appends each event to the event store and then
publishes it, with its sequence, on the in-process EventBus (after the commit
when the append joined a transaction). This module subscribes to every event on
that bus and writes each as one NDJSON line, ``json.dumps(event.to_dict())``,
to snapshotd. Usage::

    from stabilize.events import configure_event_sourcing, get_event_bus
    from stabilize_forwarder import install

    configure_event_sourcing(event_store)
    forwarder = install(get_event_bus())    # path: $SNAPSHOTD_SOCKET__PATH or ./snapshotd.sock
    ...
    forwarder.flush(timeout=5)              # optional: wait until snapshotd confirms
    forwarder.close()

The bus handler only enqueues; it never blocks the engine. A background thread
sends, reconnecting with capped exponential backoff when the daemon restarts.
Meanwhile up to ``max_buffer`` events wait in memory; beyond that new events
are dropped *and logged* (snapshotd catches up from the events table when it
hydrates an entity). Sent lines are kept until a ``flush`` reply confirms them
(the forwarder sends one after ``flush_every`` events, and after a second of
quiet while anything is unconfirmed) and
are sent again after a reconnect: delivery is at-least-once, and snapshotd
ignores sequences it has already folded. A reader thread drains reply lines
and logs error replies (``{"ok": false, "frame": N, "error": ...}``). A flush
reply names its frame; it confirms every line sent before that frame on the
connection, so replies are matched by frame number, not by arrival order.
Counters: ``dropped`` (buffer full), ``received`` (events handed to the
handler), ``rejected`` (error replies naming one of our frames) and
``connections`` (successful connects, reconnects included).

With ``durable=True`` every flush the forwarder sends is
``{"op":"flush","snapshot":true}``: snapshotd answers it only once every
entity touched before it is snapshotted and committed, so lines are kept
until they survive even a ``kill -9`` of the daemon. Use it when snapshotd
does not share stabilize's database (socket only); with a shared database
the events table already recovers everything, and a plain flush is cheaper.

Call ``install`` *after* ``configure_event_sourcing``: that call replaces
stabilize's global bus, and a forwarder subscribed to the old one hears nothing.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
from typing import Any

log = logging.getLogger("snapshotd.forwarder")
FLUSH = b'{"op":"flush"}\n'
# A barrier that survives a crash of the daemon: answered once every entity
# touched before it is snapshotted and committed.
DURABLE_FLUSH = b'{"op":"flush","snapshot":true}\n'


class SnapshotdForwarder:
    """Buffered, reconnecting, at-least-once NDJSON writer to snapshotd's socket."""

    def __init__(self, socket_path: str | None = None, max_buffer: int = 10_000,
                 max_backoff: float = 5.0, flush_every: int = 500, durable: bool = False) -> None:
        self.socket_path = socket_path or os.environ.get("SNAPSHOTD_SOCKET__PATH", "./snapshotd.sock")
        self.max_buffer, self.max_backoff, self.flush_every = max_buffer, max_backoff, flush_every
        # Socket-only deployments (no shared database) keep lines until a
        # durable flush confirms them: a plain flush only says "folded".
        self._flush_line = DURABLE_FLUSH if durable else FLUSH
        self.dropped = 0      # events dropped because the buffer was full
        self.received = 0     # events handed to handle() with a store sequence
        self.rejected = 0     # error replies from snapshotd naming one of our frames
        self.connections = 0  # successful connects (1 + reconnects)
        # Waiting to be sent: (line, flush waiter, is_control)
        self._buf: collections.deque[tuple[bytes, threading.Event | None, bool]] = collections.deque()
        # Sent on the current connection, not yet confirmed: (frame number, line)
        self._unacked: collections.deque[tuple[int, bytes]] = collections.deque()
        # Flushes sent on the current connection, not yet answered: (frame number, waiter)
        self._marks: collections.deque[tuple[int, threading.Event | None]] = collections.deque()
        self._frame = 0        # frames sent on the current connection (snapshotd numbers them from 1)
        self._since_mark = 0   # event lines sent since the last flush mark
        self._flush_sent = 0.0  # monotonic time the last flush was sent
        self._confirmed = 0     # flush replies received on the current connection
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="snapshotd-forwarder", daemon=True)
        self._thread.start()

    def handle(self, event: Any) -> None:
        """EventBus handler: queue one event (never blocks)."""
        if event.sequence <= 0:
            log.warning("Skipping event %s without a store sequence.", event.event_id)
            return
        line = (json.dumps(event.to_dict()) + "\n").encode()
        with self._cv:
            self.received += 1
            if len(self._buf) >= self.max_buffer:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("Buffer full (%d events, snapshotd unreachable?): %d events dropped so far.",
                              self.max_buffer, self.dropped)
                return
            self._buf.append((line, None, False))
            self._cv.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Send a ``flush`` barrier; True once snapshotd confirms everything sent before it."""
        done = threading.Event()
        with self._cv:
            self._buf.append((self._flush_line, done, True))
            self._cv.notify_all()
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Flush, then stop (each step waits at most ``timeout`` seconds)."""
        with self._cv:
            pending = bool(self._buf or self._unacked)
        if pending:
            self.flush(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)
        with self._cv:
            unsent = sum(1 for _, _, control in self._buf if not control)
        if unsent:
            log.error("Closed with %d unsent events.", unsent)

    def _run(self) -> None:
        backoff, outage = 0.1, False
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                if not outage:
                    log.warning("Cannot reach snapshotd at %s: %s; retrying.", self.socket_path, exc)
                outage = True
                if not self._pause(backoff):  # give up on close rather than wait for the daemon forever
                    return
                backoff = min(backoff * 2, self.max_backoff)
                continue
            log.info("Connected to snapshotd at %s.", self.socket_path)
            outage, alive = False, threading.Event()
            alive.set()
            with self._cv:
                self.connections += 1
                self._frame = self._since_mark = self._confirmed = 0
            threading.Thread(target=self._read_replies, args=(sock, alive), daemon=True).start()
            finished = self._send_loop(sock, alive)
            try:
                sock.shutdown(socket.SHUT_RDWR)  # also ends the reader thread
            except OSError:
                pass
            sock.close()
            with self._cv:  # resend what was never confirmed, then the unanswered flushes
                alive.clear()
                if finished:
                    if self._unacked:
                        log.warning("Closed with %d sent lines unconfirmed.", len(self._unacked))
                    return
                redo = [(line, None, False) for _, line in self._unacked] + [(self._flush_line, w, True) for _, w in self._marks]
                self._buf.extendleft(reversed(redo))
                self._unacked.clear()
                self._marks.clear()
                confirmed = self._confirmed
            if not confirmed:  # a daemon that accepts, then drops us before confirming anything: back off
                if not self._pause(backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff)
            else:
                backoff = 0.1

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` unless closed first; False when closed."""
        deadline = time.monotonic() + seconds
        with self._cv:
            while not self._closed and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())
            return not self._closed

    def _send_loop(self, sock: socket.socket, alive: threading.Event) -> bool:
        """Send until closed and drained (True) or the connection breaks (False).

        Lines are numbered and recorded as unconfirmed *before* they are
        written, so a flush reply that overtakes the bookkeeping is never
        lost; a write that fails leaves them unconfirmed, to be sent again.
        """
        while True:
            with self._cv:
                while True:
                    if not alive.is_set():
                        return False
                    if len(self._unacked) >= self.max_buffer:
                        # Too much unconfirmed: wait for a flush reply instead of
                        # forgetting lines (the buffer absorbs new events meanwhile).
                        if not self._marks:
                            batch = [(self._flush_line, None, True)]
                            break
                        self._cv.wait(1.0)
                        continue
                    if self._buf:
                        room = self.max_buffer - len(self._unacked)
                        batch = [self._buf.popleft() for _ in range(min(len(self._buf), 512, room))]
                        break
                    if self._closed:
                        return True
                    if (not self._cv.wait(1.0) and (self._unacked or self._marks)
                            and time.monotonic() - self._flush_sent >= 1.0):
                        # A quiet second: confirm what was sent (a newer flush also
                        # answers one whose reply was refused or never came).
                        self._buf.append((self._flush_line, None, True))
                out: list[bytes] = []
                for line, waiter, control in batch:
                    out.append(line)
                    self._frame += 1
                    if control:
                        self._marks.append((self._frame, waiter))
                        self._since_mark, self._flush_sent = 0, time.monotonic()
                    else:
                        self._unacked.append((self._frame, line))
                        self._since_mark += 1
                        if self._since_mark >= self.flush_every:
                            self._frame += 1
                            out.append(self._flush_line)
                            self._marks.append((self._frame, None))
                            self._since_mark, self._flush_sent = 0, time.monotonic()
            try:
                sock.sendall(b"".join(out))
            except OSError as exc:
                log.warning("Lost snapshotd connection (%s); will resend the unconfirmed lines.", exc)
                return False

    def _read_replies(self, sock: socket.socket, alive: threading.Event) -> None:
        try:
            for raw in sock.makefile("rb"):
                try:
                    reply = json.loads(raw)
                except ValueError:
                    log.warning("Unreadable reply from snapshotd: %r", raw[:200])
                    continue
                if not isinstance(reply, dict):
                    continue
                op = reply.get("op")
                if reply.get("ok") is False:
                    if op is None:
                        with self._cv:
                            self.rejected += 1
                        log.warning("snapshotd rejected frame %s: %s", reply.get("frame"), reply.get("error"))
                    else:  # e.g. a flush refused while the daemon shuts down: the reconnect resends it
                        log.warning("snapshotd could not %s (frame %s): %s", op, reply.get("frame"),
                                    reply.get("error"))
                    continue
                if op not in (None, "flush"):
                    continue
                with self._cv:  # a confirmed flush covers every line sent before it
                    if not alive.is_set() or not self._marks:
                        continue
                    frame = reply.get("frame")
                    if not isinstance(frame, int):  # a daemon that does not number replies: in order
                        frame = self._marks[0][0]
                    self._confirmed += 1
                    while self._marks and self._marks[0][0] <= frame:
                        _, waiter = self._marks.popleft()
                        if waiter is not None:
                            waiter.set()
                    while self._unacked and self._unacked[0][0] < frame:
                        self._unacked.popleft()
                    self._cv.notify_all()
        except OSError:
            pass
        with self._cv:
            alive.clear()
            self._cv.notify_all()


def install(bus: Any = None, socket_path: str | None = None, **kwargs: Any) -> SnapshotdForwarder:
    """Subscribe a forwarder to every event of ``bus`` (default: stabilize's global bus)."""
    if bus is None:
        from stabilize.events import get_event_bus

        bus = get_event_bus()
    forwarder = SnapshotdForwarder(socket_path, **kwargs)
    bus.subscribe("snapshotd-forwarder", forwarder.handle)  # SYNC: handle() only enqueues
    return forwarder


if __name__ == "__main__":  # demo: record a few events in a throwaway SQLite store
    import tempfile

    from stabilize.events import (EntityType, EventMetadata, EventType, SqliteEventStore,
                                  configure_event_sourcing, create_workflow_event, get_event_bus)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    store = SqliteEventStore(f"sqlite:///{tempfile.mkdtemp()}/demo.db", create_tables=True)
    recorder = configure_event_sourcing(store)
    fwd = install(get_event_bus())
    wf = "01JDEMO0000000000000000000"
    for etype, data in [(EventType.WORKFLOW_CREATED, {"application": "demo", "name": "hello"}),
                        (EventType.WORKFLOW_STARTED, {"context": {"n": 1}})]:
        event = create_workflow_event(etype, wf, 1, data, EventMetadata(correlation_id=wf))
        get_event_bus().publish(store.append(event))  # what the recorder does for you
    for i in range(3):
        recorder.record_context_updated(EntityType.WORKFLOW, wf, wf, {"step": i})
    print("flush confirmed" if fwd.flush(timeout=5) else "flush NOT confirmed (is snapshotd running?)")
    fwd.close()
