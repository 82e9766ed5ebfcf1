#!/usr/bin/env python3
"""Run stabilize workflows through stabilize's own event sourcing into snapshotd.

Unlike ``gen_workflows.py`` (which appends to the store and writes a file),
this behaves like a stabilize application with ``examples/stabilize_forwarder.py``
installed:

1. stabilize's event store for the backend (``PostgresEventStore`` /
   ``SqliteEventStore``, tables created when missing);
2. ``recorder = configure_event_sourcing(store)`` -- which also replaces
   stabilize's global ``EventBus`` -- and only then
   ``forwarder = install(get_event_bus(), --socket)``;
3. the events of ``--workflows`` workflows (``gen_workflows.workflow_script``:
   stages, tasks, retries, failures, context updates, schema_version 2 events,
   event types this build does not know, awkward payload values) are recorded
   through the ``EventRecorder`` by ``--threads`` worker threads, with
   ``--concurrency`` workflows in flight at a time. Like the engine's handlers,
   a worker records one "step" (1-3 events of one workflow) inside a store
   transaction scope (``txn_scope.begin_store_transaction`` on a connection of
   the event store's database, as ``WorkflowStore.transaction()`` does): the
   recorder joins the transaction and the bus publishes only after COMMIT.
   The workflow's next step becomes available to other workers right after
   COMMIT, before this worker publishes, as the engine's next queue message
   does -- so events reach the bus late and out of sequence order, also
   within one workflow (``--publish-delay`` widens that window). Some steps record outside any transaction (published
   at once), some use ``_record_batch``, and workflow-level ``context.updated``
   events go through the public ``record_context_updated``. An event of a
   type this build does not know is recorded as ``unknown.event`` with
   ``data["_raw_event_type"]`` (what stabilize does with one it reads);
4. ``forwarder.flush(timeout=--flush-timeout)`` (snapshotd replies once
   everything sent before it is folded and the snapshots it triggered are
   committed), then ``forwarder.close()``.

Usage::

    forward_workflows.py --backend postgres --dsn URL --socket PATH --workflows N --seed S
    forward_workflows.py --backend sqlite --path FILE --socket PATH --workflows N --seed S

snapshotd must use the same database (Postgres) or file (SQLite), so that it
sees stabilize's ``events`` table. stdout: one JSON line
``{"workflows": N, "events": E, "dropped": D}``; stderr: details (time taken,
reconnects). Exit 0 when the final flush was confirmed and nothing was
dropped or rejected, 1 with a reason on stderr otherwise (flush timed out,
events dropped or rejected, recording failed), 2 on usage or connection
problems (database or socket unreachable at start).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import socket
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples")]

try:
    from gen_workflows import Gen, Spec, build_event, workflow_script  # noqa: E402  (exits 1 without stabilize)
    from stabilize.events import (  # noqa: E402
        EntityType,
        Event,
        EventType,
        configure_event_sourcing,
        get_event_bus,
        set_event_context,
    )
    from stabilize.events.txn_scope import (  # noqa: E402
        abort_store_transaction,
        begin_store_transaction,
        commit_store_transaction,
    )
    from stabilize_forwarder import install  # noqa: E402
except ImportError as exc:  # pragma: no cover - environment problem
    sys.stderr.write(f"forward_workflows: cannot import stabilize or the forwarder ({exc}); "
                     "use the project's .venv python\n")
    sys.exit(2)

UTC = timezone.utc
log = logging.getLogger("forward_workflows")


class Fatal(Exception):
    """Usage or connection problem: exit 2."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Item:
    """One event to record: a prebuilt Event, or a workflow context update."""

    event: Event | None = None
    context: dict[str, Any] | None = None  # with record_context_updated
    version: int = 0


@dataclasses.dataclass
class Step:
    """What one handler invocation records: some events of one workflow."""

    items: list[Item]
    mode: str  # "txn" (record in a transaction), "batch" (_record_batch in one), "direct" (no transaction)


def build_plan(g: Gen, workflows: int) -> list[tuple[str, list[Step]]]:
    """Every workflow's steps, causally ordered; deterministic from the seed."""
    rng = g.rng
    base = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 300 * 86400),
                                                         microseconds=rng.randint(0, 999999))
    plan = []
    for _ in range(workflows):
        start = base + timedelta(seconds=rng.randint(0, 3600))
        wf_id = g.ulid(start)
        script = workflow_script(g, wf_id, start)
        clock, versions, causation = start, {}, None
        items: list[Item] = []
        for spec in script:
            clock += timedelta(milliseconds=rng.randint(0, 4000), microseconds=rng.randint(0, 999))
            vkey = f"{spec.entity_type.value}/{spec.entity_id}"
            versions[vkey] = versions.get(vkey, 0) + 1
            version = versions[vkey]
            if (spec.event_type == "context.updated" and spec.entity_type is EntityType.WORKFLOW
                    and spec.schema_version == 1 and rng.random() < 0.7):
                items.append(Item(context=spec.data["context"], version=version))
                continue
            if spec.event_type in EventType._value2member_map_:
                ev = build_event(g, spec, wf_id, version, causation, clock)
            else:  # a type this build does not know: what stabilize makes of one it reads
                shell = Spec("custom.progress", spec.entity_type, spec.entity_id, spec.data, spec.schema_version)
                ev = build_event(g, shell, wf_id, version, causation, clock)
                ev = dataclasses.replace(ev, event_type=EventType.UNKNOWN,
                                         data={**spec.data, "_raw_event_type": spec.event_type})
            causation = ev.event_id
            items.append(Item(event=ev, version=version))
        steps: list[Step] = []
        i = 0
        while i < len(items):
            size = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
            mode = rng.choices(["txn", "batch", "direct"], weights=[7, 1, 2])[0]
            steps.append(Step(items[i:i + size], mode))
            i += size
        plan.append((wf_id, steps))
    return plan


# --------------------------------------------------------------------------- recording


class Recorder:
    """Records steps through stabilize's EventRecorder, the way its handlers do."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.backend = args.backend
        self.publish_delay = args.publish_delay / 1000
        if args.backend == "postgres":
            import psycopg
            from stabilize.events.store.postgres import PostgresEventStore

            self.retryable: tuple[type[BaseException], ...] = (psycopg.OperationalError,)
            self.store = PostgresEventStore(args.dsn, create_tables=True)
        else:
            from stabilize.events.store.sqlite import SqliteEventStore

            self.retryable = (sqlite3.OperationalError,)
            self.store = SqliteEventStore("sqlite:///" + os.path.abspath(args.path), create_tables=True)
        self.url = self.store._connection_string  # what a same-database transaction scope carries
        self.recorder = configure_event_sourcing(self.store)  # replaces the global bus: subscribe after

    @contextmanager
    def transaction(self, after_commit: Callable[[], None]) -> Iterator[None]:
        """A store transaction as ``WorkflowStore.transaction()`` opens one.

        Events recorded inside join it; the bus publishes them after COMMIT.
        ``after_commit`` runs between COMMIT and that publication.
        """
        if self.backend == "postgres":
            with self.store._pool.connection() as conn:
                yield from self._scoped(conn, after_commit)
        else:
            yield from self._scoped(self.store._get_connection(), after_commit)

    def _scoped(self, conn: Any, after_commit: Callable[[], None]) -> Iterator[None]:
        begin_store_transaction(conn, self.url)
        try:
            yield
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            finally:
                abort_store_transaction()
            raise
        after_commit()
        if self.publish_delay and random.random() < 0.25:  # the engine's post-commit work, stretched
            time.sleep(random.uniform(0, self.publish_delay))
        commit_store_transaction()

    def record(self, wf_id: str, item: Item) -> Event:
        if item.context is not None:
            return self.recorder.record_context_updated(EntityType.WORKFLOW, wf_id, wf_id, item.context,
                                                        version=item.version, source_handler="ForwardWorkflows")
        assert item.event is not None
        return self.recorder._record(item.event)

    def run_step(self, wf_id: str, step: Step, after_commit: Callable[[], None]) -> int:
        """Record one step (retrying lock/connection errors); return the events recorded."""
        set_event_context(correlation_id=wf_id, causation_id=None, actor="forward_workflows")
        if step.mode == "direct":  # no transaction: each append commits and publishes at once
            for item in step.items:
                self._retry(lambda: self.record(wf_id, item))
            after_commit()
            return len(step.items)

        def attempt() -> None:
            with self.transaction(after_commit):
                if step.mode == "batch" and all(it.event is not None for it in step.items):
                    self.recorder._record_batch([it.event for it in step.items])  # type: ignore[misc]
                else:
                    for item in step.items:
                        self.record(wf_id, item)

        self._retry(attempt)
        return len(step.items)

    def _retry(self, fn: Callable[[], Any]) -> Any:
        for attempt in range(8):
            try:
                return fn()
            except self.retryable as exc:
                if attempt == 7:
                    raise
                log.warning("Recording failed (%s); retrying.", first_line(exc))
                time.sleep(0.05 * 2 ** attempt)

    def current_sequence(self) -> int:
        return int(self.store.get_current_sequence() or 0)

    def close(self) -> None:
        if self.backend == "postgres":
            self.store.close()


class Runner:
    """Worker threads taking ready workflows' next steps; ``concurrency`` workflows in flight."""

    def __init__(self, rec: Recorder, plan: list[tuple[str, list[Step]]], threads: int, concurrency: int,
                 seed: int) -> None:
        self.rec, self.plan, self.threads, self.seed = rec, plan, threads, seed
        self.cursor = [0] * len(plan)
        self.cv = threading.Condition()
        self.ready = list(range(min(concurrency, len(plan))))
        self.admitted = len(self.ready)
        self.done = 0
        self.events = 0
        self.error: BaseException | None = None

    def run(self) -> int:
        workers = [threading.Thread(target=self._worker, args=(i,), name=f"worker-{i}", daemon=True)
                   for i in range(self.threads)]
        for w in workers:
            w.start()
        try:
            for w in workers:
                while w.is_alive():
                    w.join(0.5)
        except KeyboardInterrupt:
            with self.cv:
                self.error = KeyboardInterrupt()
                self.cv.notify_all()
            raise
        if self.error is not None:
            raise self.error
        return self.events

    def _finished(self) -> bool:
        return self.error is not None or self.done == len(self.plan)

    def _worker(self, no: int) -> None:
        rng = random.Random(f"worker:{self.seed}:{no}")
        while True:
            with self.cv:
                while not self.ready and not self._finished():
                    self.cv.wait()
                if self._finished():
                    return
                wi = self.ready.pop(rng.randrange(len(self.ready)))
            wf_id, steps = self.plan[wi]
            step = steps[self.cursor[wi]]
            self.cursor[wi] += 1
            last = self.cursor[wi] == len(steps)

            def release() -> None:  # after COMMIT: the workflow's next step may run elsewhere
                with self.cv:
                    if not last:
                        self.ready.append(wi)
                    else:
                        self.done += 1
                        if self.admitted < len(self.plan):
                            self.ready.append(self.admitted)
                            self.admitted += 1
                    self.cv.notify_all()

            try:
                n = self.rec.run_step(wf_id, step, release)
            except BaseException as exc:  # noqa: BLE001 - reported by run()
                with self.cv:
                    if self.error is None:
                        self.error = exc
                    self.cv.notify_all()
                return
            with self.cv:
                self.events += n


class Disorder:
    """Counts events the bus published after one with a higher sequence."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.top = 0
        self.top_of: dict[str, int] = {}
        self.behind = 0             # below the highest sequence published before it
        self.behind_in_workflow = 0  # ... of its own workflow

    def handle(self, event: Event) -> None:
        with self.lock:
            self.behind += event.sequence < self.top
            self.top = max(self.top, event.sequence)
            top = self.top_of.get(event.workflow_id, 0)
            self.behind_in_workflow += event.sequence < top
            self.top_of[event.workflow_id] = max(top, event.sequence)


# --------------------------------------------------------------------------- checks


def check_database(args: argparse.Namespace) -> None:
    if args.backend == "postgres":
        import psycopg

        try:
            psycopg.connect(args.dsn, connect_timeout=5).close()
        except Exception as exc:
            raise Fatal(f"cannot connect to {args.dsn}: {first_line(exc)}") from None
    else:
        folder = os.path.dirname(os.path.abspath(args.path))
        if not os.path.isdir(folder):
            raise Fatal(f"no such directory for the SQLite file: {folder}")


def check_socket(path: str, timeout: float) -> None:
    """Wait up to ``timeout`` s for snapshotd to answer a ping on ``path``."""
    deadline = time.monotonic() + timeout
    last: str = "no attempt"
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(path)
                s.sendall(b'{"op":"ping"}\n')
                reply = s.makefile("rb").readline()
                if json.loads(reply).get("ok") is True:
                    return
                last = f"unexpected reply {reply[:200]!r}"
        except (OSError, ValueError) as exc:
            last = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            raise Fatal(f"snapshotd does not answer on {path}: {last}")
        time.sleep(0.2)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--backend", choices=["postgres", "sqlite"], required=True)
    p.add_argument("--dsn", help="PostgreSQL URL (with --backend postgres)")
    p.add_argument("--path", help="SQLite database file (with --backend sqlite)")
    p.add_argument("--socket", required=True, help="snapshotd's Unix socket")
    p.add_argument("--workflows", type=int, default=100, help="number of workflows (default 100)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--threads", type=int, default=4, help="recording worker threads (default 4)")
    p.add_argument("--concurrency", type=int, default=12, help="workflows in flight at a time (default 12)")
    p.add_argument("--flush-timeout", type=float, default=60.0,
                   help="seconds to wait for snapshotd to confirm the final flush (default 60)")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to wait for snapshotd to answer at start (default 10)")
    p.add_argument("--publish-delay", type=float, default=5.0, metavar="MS",
                   help="a quarter of the transactions wait up to MS ms between COMMIT and publishing, "
                        "so a workflow's next step can overtake them on the bus (default 5; 0 = off)")
    p.add_argument("--portable-numbers", action="store_true",
                   help="omit floats whose value Postgres JSONB changes (-0.0, floats >= 1e16)")
    p.add_argument("--max-buffer", type=int, default=10_000,
                   help="events the forwarder holds while the daemon is away (default 10000)")
    p.add_argument("--allow-drops", action="store_true",
                   help="events the forwarder drops (buffer full) are not a failure (the table feed recovers them)")
    p.add_argument("--durable", action="store_true",
                   help="the forwarder's flushes ask for snapshots (socket only, no shared database)")
    p.add_argument("-v", "--verbose", action="store_true", help="log the forwarder's connects and retries")
    args = p.parse_args(argv)
    if args.backend == "postgres" and not args.dsn:
        p.error("--backend postgres needs --dsn")
    if args.backend == "sqlite" and not args.path:
        p.error("--backend sqlite needs --path")
    if args.workflows < 1 or args.threads < 1 or args.concurrency < 1:
        p.error("--workflows, --threads and --concurrency must be >= 1")
    if args.flush_timeout <= 0:
        p.error("--flush-timeout must be > 0")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # stabilize logs a warning for each schema_version > 1 event it replays; and
    # the recorder logs every failed append we retry ourselves.
    logging.getLogger("stabilize.events.replay").setLevel(logging.ERROR)

    rec = None
    forwarder = None
    started = time.monotonic()
    try:
        check_database(args)
        check_socket(args.socket, args.connect_timeout)
        try:
            rec = Recorder(args)
        except Exception as exc:
            raise Fatal(f"stabilize cannot open the event store: {first_line(exc)}") from None
        bus = get_event_bus()  # the bus configure_event_sourcing just installed
        forwarder = install(bus, args.socket, durable=args.durable, max_buffer=args.max_buffer)
        disorder = Disorder()
        bus.subscribe("forward-workflows-disorder", disorder.handle)
        g = Gen(args.seed, args.backend, args.portable_numbers, rec.current_sequence())
        plan = build_plan(g, args.workflows)
        events = Runner(rec, plan, args.threads, args.concurrency, args.seed).run()
        recorded = time.monotonic()
        if get_event_bus() is not bus:
            sys.stderr.write("forward_workflows: stabilize's event bus was replaced during the run\n")
            return 1
        confirmed = forwarder.flush(timeout=args.flush_timeout)
        flushed = time.monotonic()
        forwarder.close(timeout=5.0 if confirmed else 1.0)  # no second long wait for a daemon that is stuck
    except Fatal as exc:
        sys.stderr.write(f"forward_workflows: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("forward_workflows: interrupted\n")
        if forwarder is not None:
            forwarder.close(timeout=2)
        return 1
    except Exception as exc:
        sys.stderr.write(f"forward_workflows: recording failed: {first_line(exc)}\n")
        if forwarder is not None:
            forwarder.close(timeout=2)
        return 1
    finally:
        if rec is not None:
            rec.close()

    print(json.dumps({"workflows": args.workflows, "events": events, "dropped": forwarder.dropped}))
    sys.stdout.flush()
    detail = {"backend": args.backend, "received": forwarder.received, "rejected": forwarder.rejected,
              "connections": forwarder.connections, "flush_confirmed": confirmed,
              "published_out_of_order": disorder.behind, "within_workflow": disorder.behind_in_workflow,
              "record_seconds": round(recorded - started, 2), "flush_seconds": round(flushed - recorded, 2),
              "total_seconds": round(time.monotonic() - started, 2)}
    sys.stderr.write(json.dumps(detail) + "\n")
    problems = []
    if not confirmed:
        problems.append(f"snapshotd did not confirm the final flush within {args.flush_timeout:g} s")
    if forwarder.dropped and not args.allow_drops:
        problems.append(f"the forwarder dropped {forwarder.dropped} events (buffer full)")
    if forwarder.rejected:
        problems.append(f"snapshotd rejected {forwarder.rejected} frames")
    if forwarder.received != events:
        problems.append(f"the forwarder received {forwarder.received} of the {events} events recorded")
    for problem in problems:
        sys.stderr.write(f"forward_workflows: {problem}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
