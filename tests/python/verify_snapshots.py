#!/usr/bin/env python3
"""Cross-check every row of the ``snapshots`` table against stabilize 0.33.1.

For each row (written by snapshotd, not by Python):

1. build the dict exactly as stabilize's ``get_latest_snapshot`` builds it for
   the backend (Postgres: ``state`` as psycopg's JSONB loader returns it;
   SQLite: ``json.loads`` of the TEXT column; ``state_hash`` included) and
   require ``Snapshot.from_dict`` to accept it (its SHA-256 integrity check);
2. require its state to equal
   ``EventReplayer(store).rebuild_workflow_state(workflow_id, as_of_sequence=sequence)``
   computed by stabilize on the same ``events`` table, compared as the text of
   ``json.dumps(x, sort_keys=True, default=str)`` (stricter than ``==``,
   which holds ``1 == 1.0``);
3. require ``version`` == the number of events of the workflow with
   ``sequence <= row.sequence``, ``sequence`` to be an event of that workflow,
   ``entity_type == 'workflow'``, ``entity_id == workflow_id``, a non-NULL
   hash, and versions of one entity to grow with their sequences.

Postgres sessions run with ``TimeZone=UTC`` (``PGTZ=UTC`` is set before
connecting; the effective setting is checked), which is what the snapshot
times are defined against.

Usage::

    verify_snapshots.py --backend postgres --dsn URL [--min-rows K]
    verify_snapshots.py --backend sqlite --path FILE [--min-rows K]
    verify_snapshots.py ... --self-test

stdout: one JSON line ``{"rows": N, "ok": N, "failures": N}``. stderr: the
first ``--show`` failures with both states. Exit 0 when every row passes and
there are at least ``--min-rows`` rows (default 1), 1 otherwise, 2 on usage or
connection problems.

``--self-test`` checks the verifier itself without the daemon: it writes
snapshots computed by stabilize's own replay (a few sequences per workflow,
plain INSERT of the JSON text and its hash), verifies them (must pass), then
tampers with one row three ways -- state changed with the old hash, state
changed with a recomputed hash, version off by one -- and requires each to
fail, restoring the row after each. Run it on a scratch database only.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import os
import random
import sys
from typing import Any

os.environ["PGTZ"] = "UTC"  # before libpq reads it
# Replay logs a warning for every schema_version > 1 event it skips; expected here.
logging.getLogger("stabilize.events.replay").setLevel(logging.ERROR)

try:
    from stabilize.events import EventReplayer
    from stabilize.events.snapshots import Snapshot
except ImportError as exc:  # pragma: no cover - environment problem
    sys.stderr.write(f"verify_snapshots: cannot import stabilize ({exc}); use the project's .venv python\n")
    sys.exit(2)


class UsageError(Exception):
    """Bad arguments, unreachable database or missing tables (exit 2)."""


def canonical(x: Any) -> str:
    """What stabilize hashes: ``json.dumps(x, sort_keys=True, default=str)``."""
    return json.dumps(x, sort_keys=True, default=str)


def state_hash(state: Any) -> str:
    return hashlib.sha256(canonical(state).encode()).hexdigest()


class Db:
    """stabilize's store for the backend plus raw access to its own connection."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.backend = args.backend
        if args.backend == "postgres":
            import psycopg

            try:
                psycopg.connect(args.dsn, connect_timeout=5).close()
            except Exception as exc:
                raise UsageError(f"cannot connect to {args.dsn}: {str(exc).strip().splitlines()[0]}") from None
            from stabilize.events.store.postgres import PostgresEventStore

            self.store = PostgresEventStore(args.dsn, create_tables=False)
            tz = self.query("SHOW TimeZone")[0]["TimeZone"]
            if tz not in ("UTC", "Etc/UTC"):
                raise UsageError(f"session TimeZone is {tz!r}, not UTC (remove the TimeZone option from the DSN)")
        else:
            if not os.path.exists(args.path):
                raise UsageError(f"no such SQLite file: {args.path}")
            from stabilize.events.store.sqlite import SqliteEventStore

            self.store = SqliteEventStore("sqlite:///" + os.path.abspath(args.path), create_tables=False)
            names = {r["name"] for r in self.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = {"events", "snapshots"} - names
            if missing:
                raise UsageError(f"{args.path} has no table(s): {', '.join(sorted(missing))}")

    def query(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        if self.backend == "postgres":
            with self.store._pool.connection() as conn:
                cur = conn.execute(sql.replace("?", "%s"), params)
                rows = list(cur.fetchall()) if cur.description is not None else []
                conn.commit()
                return rows
        conn = self.store._get_connection()
        rows = [dict(r) for r in conn.execute(sql, params).fetchall()]
        conn.commit()
        return rows

    def close(self) -> None:
        if self.backend == "postgres":
            self.store.close()


def stabilize_dict(row: dict[str, Any], backend: str) -> dict[str, Any]:
    """The dict stabilize's get_latest_snapshot returns for this row."""
    state = row["state"]
    if backend == "sqlite":
        state = json.loads(state) if state else {}
    elif isinstance(state, str):  # a JSON string scalar stored in JSONB
        state = json.loads(state)
    result = {k: row[k] for k in ("entity_type", "entity_id", "workflow_id", "version", "sequence")}
    result["state"] = state
    if row.get("state_hash") is not None:
        result["state_hash"] = row["state_hash"]
    return result


def verify(db: Db, min_rows: int, show: int, quiet: bool = False) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Check every snapshot row; return the summary and the failures."""
    rows = db.query("SELECT * FROM snapshots ORDER BY entity_type, entity_id, version")
    seqs: dict[str, list[int]] = {}
    for r in db.query("SELECT workflow_id, sequence FROM events ORDER BY sequence"):
        seqs.setdefault(r["workflow_id"], []).append(int(r["sequence"]))
    replayer = EventReplayer(db.store)
    failures: list[dict[str, Any]] = []
    last_of_entity: dict[tuple[str, str], tuple[int, int]] = {}
    for row in rows:
        where = {k: row.get(k) for k in ("id", "entity_type", "entity_id", "version", "sequence")}
        problems: list[str] = []
        detail: dict[str, Any] = {}
        try:
            data = stabilize_dict(row, db.backend)
        except (ValueError, TypeError) as exc:
            failures.append({**where, "problems": [f"state is not JSON stabilize can read: {exc}"]})
            continue
        if row.get("state_hash") is None:
            problems.append("state_hash is NULL (stabilize would skip its integrity check)")
        if not isinstance(data["state"], dict):
            problems.append(f"state is a JSON {type(data['state']).__name__}, not an object")
        snap = None
        try:
            snap = Snapshot.from_dict(data)
        except ValueError as exc:
            problems.append(f"Snapshot.from_dict refused the row: {exc}")
        if row["entity_type"] != "workflow":
            problems.append(f"entity_type is {row['entity_type']!r}, not 'workflow'")
        if row["entity_id"] != row["workflow_id"]:
            problems.append(f"entity_id {row['entity_id']!r} != workflow_id {row['workflow_id']!r}")
        wf_seqs = seqs.get(row["workflow_id"], [])
        seq = int(row["sequence"])
        i = bisect.bisect_right(wf_seqs, seq)
        if row["version"] != i:
            problems.append(f"version {row['version']} != {i} events of the workflow up to sequence {seq}")
        if i == 0 or wf_seqs[i - 1] != seq:
            problems.append(f"sequence {seq} is not an event of workflow {row['workflow_id']}")
        key = (row["entity_type"], row["entity_id"])
        prev = last_of_entity.get(key)
        if prev is not None and seq <= prev[1]:
            problems.append(f"version {row['version']} has sequence {seq} <= {prev[1]} of version {prev[0]}")
        last_of_entity[key] = (row["version"], seq)
        expected = canonical(replayer.rebuild_workflow_state(row["workflow_id"], as_of_sequence=seq))
        got = canonical(snap.state if snap is not None else data["state"])
        if got != expected:
            problems.append("state differs from stabilize's replay")
            detail = {"snapshot_state": got, "replayed_state": expected}
        if problems:
            failures.append({**where, "problems": problems, **detail})
    summary = {"rows": len(rows), "ok": len(rows) - len(failures), "failures": len(failures)}
    if not quiet:
        for f in failures[:show]:
            sys.stderr.write(json.dumps(f, ensure_ascii=False) + "\n")
        if len(rows) < min_rows:
            sys.stderr.write(f"verify_snapshots: only {len(rows)} snapshot rows, wanted at least {min_rows}\n")
    return summary, failures


def self_test(db: Db, per_workflow: int) -> list[str]:
    """Write stabilize-computed snapshots, verify, tamper, verify again. Returns problems."""
    pg = db.backend == "postgres"
    rng = random.Random(7)
    seqs: dict[str, list[int]] = {}
    for r in db.query("SELECT workflow_id, sequence FROM events ORDER BY sequence"):
        seqs.setdefault(r["workflow_id"], []).append(int(r["sequence"]))
    if not seqs:
        return ["no events: run gen_workflows.py into this database first"]
    replayer = EventReplayer(db.store)
    upsert = (
        "INSERT INTO snapshots (entity_type, entity_id, workflow_id, version, sequence, state, state_hash) "
        "VALUES ('workflow', ?, ?, ?, ?, " + ("?::jsonb" if pg else "?") + ", ?) "
        "ON CONFLICT (entity_type, entity_id, version) DO UPDATE SET sequence = excluded.sequence, "
        "state = excluded.state, state_hash = excluded.state_hash RETURNING id"
    )
    written = 0
    for wf, ss in seqs.items():
        picks = sorted({len(ss)} | set(rng.sample(range(1, len(ss) + 1), min(per_workflow - 1, len(ss)))))
        for version in picks:
            state = replayer.rebuild_workflow_state(wf, as_of_sequence=ss[version - 1])
            db.query(upsert, (wf, wf, version, ss[version - 1], json.dumps(state), state_hash(state)))
            written += 1
    sys.stderr.write(f"self-test: wrote {written} snapshots for {len(seqs)} workflows\n")
    problems = []
    summary, failures = verify(db, 1, 5)
    if failures:
        problems.append(f"clean snapshots failed verification: {summary}")
    target = db.query("SELECT id, state" + ("::text AS state" if pg else "") + ", state_hash, version "
                      "FROM snapshots ORDER BY id LIMIT 1")[0]
    setter = "jsonb_set(state, '{status}', '\"TAMPERED\"')" if pg else "json_set(state, '$.status', 'TAMPERED')"
    cast = "?::jsonb" if pg else "?"
    restore = (f"UPDATE snapshots SET state = {cast}, state_hash = ?, version = ? WHERE id = ?",
               (target["state"], target["state_hash"], target["version"], target["id"]))
    tampered_state = dict(json.loads(target["state"]), status="TAMPERED")
    cases = [
        ("state changed, old hash", f"UPDATE snapshots SET state = {setter} WHERE id = ?", (target["id"],),
         "Snapshot.from_dict refused"),
        ("state changed, hash recomputed", f"UPDATE snapshots SET state = {setter}, state_hash = ? WHERE id = ?",
         (state_hash(tampered_state), target["id"]), "differs from stabilize's replay"),
        ("version wrong", "UPDATE snapshots SET version = version + 100000 WHERE id = ?", (target["id"],),
         "version"),
    ]
    for name, sql, params, expect in cases:
        db.query(sql, params)
        try:
            _, failures = verify(db, 1, 0, quiet=True)
        finally:
            db.query(*restore)
        hit = [f for f in failures if f["id"] == target["id"] and any(expect in p for p in f["problems"])]
        sys.stderr.write(f"self-test: tamper '{name}': {'detected' if hit else 'NOT DETECTED'}"
                         f"{' (' + hit[0]['problems'][0] + ')' if hit else ''}\n")
        if not hit or len(failures) != 1:
            problems.append(f"tamper '{name}' gave failures {[(f['id'], f['problems']) for f in failures][:3]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["postgres", "sqlite"], required=True)
    p.add_argument("--dsn", help="PostgreSQL URL (with --backend postgres)")
    p.add_argument("--path", help="SQLite database file (with --backend sqlite)")
    p.add_argument("--min-rows", type=int, default=1, help="fail with fewer snapshot rows (default 1)")
    p.add_argument("--show", type=int, default=5, help="failures printed to stderr (default 5)")
    p.add_argument("--self-test", action="store_true",
                   help="write stabilize-computed snapshots, verify, and check that tampering is caught")
    p.add_argument("--self-test-per-workflow", type=int, default=4, help="snapshots per workflow (default 4)")
    args = p.parse_args(argv)
    if args.backend == "postgres" and not args.dsn:
        p.error("--backend postgres needs --dsn")
    if args.backend == "sqlite" and not args.path:
        p.error("--backend sqlite needs --path")
    db = None
    try:
        db = Db(args)
        if args.self_test:
            problems = self_test(db, max(1, args.self_test_per_workflow))
            if problems:
                sys.stderr.write(f"verify_snapshots: self-test failed: {'; '.join(problems)}\n")
                return 1
        summary, failures = verify(db, args.min_rows, args.show)
    except UsageError as exc:
        sys.stderr.write(f"verify_snapshots: {exc}\n")
        return 2
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        sys.stderr.write(f"verify_snapshots: {type(exc).__name__}: {first}\n")
        return 2
    finally:
        if db is not None:
            db.close()
    print(json.dumps(summary))
    if failures:
        sys.stderr.write(f"verify_snapshots: {len(failures)} of {summary['rows']} snapshot rows failed\n")
        return 1
    return 0 if summary["rows"] >= args.min_rows else 1


if __name__ == "__main__":
    sys.exit(main())
