#!/usr/bin/env python3
"""Read and write snapshots the way stabilize 0.33.1 does (for snapshotd's Rust tests).

Subcommands (each takes ``--backend postgres --dsn URL`` or
``--backend sqlite --path FILE``):

``init``
    Construct stabilize's store with ``create_tables=True``: creates the
    ``events``, ``snapshots`` and ``event_subscriptions`` tables (and
    stabilize's column migrations) when missing. Prints ``{"ok": true}``.

``read --keys FILE``
    FILE (``-`` = stdin) is JSONL of ``{"entity_type", "entity_id"}``. For
    each key, ``SnapshotStore(store).get_latest_snapshot(EntityType(..), id)``
    (which runs ``Snapshot.from_dict`` and its hash check). One JSONL line per
    key on stdout, in input order::

        {"entity_type", "entity_id", "found": true, "workflow_id", "version",
         "sequence", "state", "canonical", "sha256"}
        {"entity_type", "entity_id", "found": false}
        {"entity_type", "entity_id", "error": "<what stabilize raised>"}

    ``canonical`` is ``json.dumps(state, sort_keys=True, default=str)``,
    ``sha256`` its hex digest. Exit 0 even when some keys have errors.

``write --snapshots FILE``
    FILE (``-`` = stdin) is JSONL of ``{"entity_type", "entity_id",
    "workflow_id", "version", "sequence", "state"}`` (parsed with plain
    ``json.loads``: big ints stay exact). Each is written with
    ``SnapshotStore(store).save_snapshot(Snapshot(...))``, i.e. stabilize's
    own writer (``json.dumps(state, default=str)`` + upsert). One line per
    input: ``{"entity_type", "entity_id", "version", "written": true}`` or
    ``{..., "error": "..."}``. An empty file is fine (tables get created).
    Exit 0 when all were written, 1 when some failed.

Every subcommand creates stabilize's tables when missing (``--no-create`` to
refuse instead, as stabilize does by default on Postgres). Postgres sessions
use ``TimeZone=UTC``. Exit 2 with a one-line reason on stderr on usage,
input-format or connection problems.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import sys
from typing import Any, Iterator, TextIO

os.environ["PGTZ"] = "UTC"  # before libpq reads it

try:
    import psycopg
    from stabilize.events import EntityType
    from stabilize.events.snapshots import Snapshot, SnapshotStore
except ImportError as exc:  # pragma: no cover - environment problem
    sys.stderr.write(f"stabilize_io: cannot import stabilize/psycopg ({exc}); use the project's .venv python\n")
    sys.exit(2)


class Fatal(Exception):
    """Usage, input-format or connection problem: exit 2."""


# Errors that mean "the database is not usable", not "this row was refused".
FATAL_DB_ERRORS: tuple[type[BaseException], ...] = (psycopg.OperationalError, psycopg.InterfaceError,
                                                    sqlite3.OperationalError)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def open_store(args: argparse.Namespace) -> Any:
    """stabilize's event store for the backend, creating its tables unless --no-create."""
    create = not args.no_create
    if args.backend == "postgres":
        try:
            psycopg.connect(args.dsn, connect_timeout=5).close()
        except Exception as exc:
            raise Fatal(f"cannot connect to {args.dsn}: {first_line(exc)}") from None
        from stabilize.events.store.postgres import PostgresEventStore

        try:
            return PostgresEventStore(args.dsn, create_tables=create)
        except Exception as exc:
            raise Fatal(f"stabilize refused the database: {first_line(exc)}") from None
    from stabilize.events.store.sqlite import SqliteEventStore

    if not create and not os.path.exists(args.path):
        raise Fatal(f"no such SQLite file: {args.path}")
    try:
        return SqliteEventStore("sqlite:///" + os.path.abspath(args.path), create_tables=create)
    except Exception as exc:
        raise Fatal(f"cannot open {args.path}: {first_line(exc)}") from None


def jsonl(path: str, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of FILE or stdin."""
    stream: TextIO
    try:
        stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    except OSError as exc:
        raise Fatal(f"cannot read {what} file {path}: {exc.strerror}") from None
    with stream:
        for no, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise Fatal(f"{path}:{no}: not JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise Fatal(f"{path}:{no}: expected a JSON object")
            yield no, obj


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cmd_read(store: Any, args: argparse.Namespace) -> int:
    snapshots = SnapshotStore(store)
    for no, key in jsonl(args.keys, "keys"):
        if not isinstance(key.get("entity_type"), str) or not isinstance(key.get("entity_id"), str):
            raise Fatal(f"{args.keys}:{no}: need string entity_type and entity_id")
        out: dict[str, Any] = {"entity_type": key["entity_type"], "entity_id": key["entity_id"]}
        try:
            snap = snapshots.get_latest_snapshot(EntityType(key["entity_type"]), key["entity_id"])
        except FATAL_DB_ERRORS as exc:
            raise Fatal(f"database error: {first_line(exc)}") from None
        except Exception as exc:  # integrity ValueError, bad entity type, ...
            emit({**out, "error": str(exc) or type(exc).__name__})
            continue
        if snap is None:
            emit({**out, "found": False})
            continue
        canonical = json.dumps(snap.state, sort_keys=True, default=str)
        emit({**out, "found": True, "workflow_id": snap.workflow_id, "version": snap.version,
              "sequence": snap.sequence, "state": snap.state, "canonical": canonical,
              "sha256": hashlib.sha256(canonical.encode()).hexdigest()})
    return 0


def cmd_write(store: Any, args: argparse.Namespace) -> int:
    snapshots = SnapshotStore(store)
    failed = 0
    for no, rec in jsonl(args.snapshots, "snapshots"):
        missing = [k for k in ("entity_type", "entity_id", "workflow_id", "version", "sequence", "state")
                   if k not in rec]
        if missing:
            raise Fatal(f"{args.snapshots}:{no}: missing {', '.join(missing)}")
        out = {"entity_type": rec["entity_type"], "entity_id": rec["entity_id"], "version": rec["version"]}
        try:
            snapshots.save_snapshot(Snapshot(
                entity_type=EntityType(rec["entity_type"]), entity_id=rec["entity_id"],
                workflow_id=rec["workflow_id"], version=rec["version"], sequence=rec["sequence"],
                state=rec["state"]))
        except FATAL_DB_ERRORS as exc:
            raise Fatal(f"database error: {first_line(exc)}") from None
        except Exception as exc:  # e.g. Postgres refusing U+0000 in JSONB
            failed += 1
            emit({**out, "error": first_line(exc)})
            continue
        emit({**out, "written": True})
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backend", choices=["postgres", "sqlite"], required=True)
    common.add_argument("--dsn", help="PostgreSQL URL (with --backend postgres)")
    common.add_argument("--path", help="SQLite database file (with --backend sqlite)")
    common.add_argument("--no-create", action="store_true", help="do not create stabilize's tables")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("init", parents=[common], help="create stabilize's tables when missing")
    r = sub.add_parser("read", parents=[common], help="read latest snapshots through stabilize")
    r.add_argument("--keys", required=True, help="JSONL of {entity_type, entity_id}; '-' = stdin")
    w = sub.add_parser("write", parents=[common], help="write snapshots through stabilize")
    w.add_argument("--snapshots", required=True, help="JSONL of snapshots; '-' = stdin")
    args = p.parse_args(argv)
    if args.backend == "postgres" and not args.dsn:
        p.error("--backend postgres needs --dsn")
    if args.backend == "sqlite" and not args.path:
        p.error("--backend sqlite needs --path")
    store = None
    try:
        store = open_store(args)
        if args.command == "init":
            emit({"ok": True})
            return 0
        return cmd_read(store, args) if args.command == "read" else cmd_write(store, args)
    except Fatal as exc:
        sys.stderr.write(f"stabilize_io: {exc}\n")
        return 2
    finally:
        if store is not None and hasattr(store, "close"):
            store.close()


if __name__ == "__main__":
    sys.exit(main())
