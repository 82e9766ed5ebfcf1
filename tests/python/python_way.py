#!/usr/bin/env python3
"""Snapshot a stream of stabilize events the way stabilize 0.33.1 users do today.

The "Python way" baseline for ``benches/load.rs --python``: no daemon, just
stabilize's own pieces in one process.

* each line of the NDJSON file(s) (``json.dumps(event.to_dict())``, in
  sequence order) becomes an ``Event`` via ``Event.from_dict``;
* it is folded into its workflow's ``WorkflowState`` with
  ``EventReplayer._apply_event`` -- the fold ``rebuild_workflow_state`` runs,
  applied incrementally instead of re-reading the events table (the cheapest
  way to use it);
* per workflow, ``SnapshotStore.record_event`` / ``should_snapshot`` with a
  ``SnapshotPolicy(event_interval=N)`` decide, and
  ``SnapshotStore.create_workflow_snapshot(state.to_dict(), ...)`` writes
  through stabilize's store (``SqliteEventStore`` / ``PostgresEventStore``,
  one commit per snapshot, as stabilize does), with ``version`` = events of
  the workflow so far and ``sequence`` = the last event's.

Entities with events left over at the end are not snapshotted (the daemon's
timed part, up to ``send --flush``, does not include its shutdown snapshots
either).

Usage::

    python_way.py --backend sqlite --path FILE.db --event-interval 100 EVENTS.ndjson [...]
    python_way.py --backend postgres --dsn URL --event-interval 100 EVENTS.ndjson [...]

The database should be fresh: stabilize creates its tables there. Progress
goes to stderr; the last line of stdout is one JSON object::

    {"events": N, "snapshots": K, "seconds": S, "events_per_s": R}

Exit 0 on success, 2 with a one-line reason on stderr otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["PGTZ"] = "UTC"  # before libpq reads it

try:
    from stabilize.events import EventReplayer
    from stabilize.events.base import Event
    from stabilize.events.replay import WorkflowState
    from stabilize.events.snapshots import SnapshotPolicy, SnapshotStore
except ImportError as exc:  # pragma: no cover - environment problem
    sys.stderr.write(f"python_way: cannot import stabilize ({exc}); use the project's .venv python\n")
    sys.exit(2)


def open_store(args: argparse.Namespace):
    """stabilize's event store for the backend, creating its tables."""
    if args.backend == "postgres":
        from stabilize.events.store.postgres import PostgresEventStore

        return PostgresEventStore(args.dsn, create_tables=True)
    from stabilize.events.store.sqlite import SqliteEventStore

    return SqliteEventStore("sqlite:///" + os.path.abspath(args.path), create_tables=True)


def run(args: argparse.Namespace) -> dict[str, float]:
    store = open_store(args)
    try:
        snapshots = SnapshotStore(store, SnapshotPolicy(event_interval=args.event_interval))
        replayer = EventReplayer(store, snapshots)
        states: dict[str, WorkflowState] = {}
        versions: dict[str, int] = {}
        since: dict[str, int] = {}
        events = written = 0
        started = time.monotonic()
        for path in args.files:
            with open(path, encoding="utf-8") as lines:
                for line in lines:
                    if not line.strip():
                        continue
                    event = Event.from_dict(json.loads(line))
                    wf = event.workflow_id
                    state = states.get(wf)
                    if state is None:
                        state = states[wf] = WorkflowState(workflow_id=wf)
                    replayer._apply_event(state, event)
                    events += 1
                    versions[wf] = versions.get(wf, 0) + 1
                    since[wf] = since.get(wf, 0) + 1
                    snapshots.record_event(wf)
                    if snapshots.should_snapshot(wf, since[wf]):
                        snapshots.create_workflow_snapshot(state.to_dict(), wf, versions[wf], event.sequence)
                        since[wf] = 0
                        written += 1
        seconds = time.monotonic() - started
    finally:
        if hasattr(store, "close"):
            store.close()
    return {"events": events, "snapshots": written, "seconds": round(seconds, 3),
            "events_per_s": round(events / seconds if seconds > 0 else 0.0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--backend", choices=["postgres", "sqlite"], required=True)
    p.add_argument("--dsn", help="PostgreSQL URL (with --backend postgres)")
    p.add_argument("--path", help="SQLite database file (with --backend sqlite)")
    p.add_argument("--event-interval", type=int, default=100, help="SnapshotPolicy event_interval (default 100)")
    p.add_argument("files", nargs="+", help="NDJSON event files, read in order")
    args = p.parse_args(argv)
    if args.backend == "postgres" and not args.dsn:
        p.error("--backend postgres needs --dsn")
    if args.backend == "sqlite" and not args.path:
        p.error("--backend sqlite needs --path")
    if args.event_interval < 1:
        p.error("--event-interval must be >= 1")
    try:
        result = run(args)
    except Exception as exc:  # one line for the bench to show
        text = str(exc).strip()
        sys.stderr.write(f"python_way: {type(exc).__name__}: {text.splitlines()[0] if text else ''}\n")
        return 2
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
