#!/usr/bin/env python3
"""Generate realistic stabilize workflows into a stabilize event store.

The events are built with stabilize's own classes (``Event``, ``EventType``,
``EntityType``, ``EventMetadata`` and the ``create_*_event`` helpers) and
appended through stabilize's own store (``PostgresEventStore`` /
``SqliteEventStore``), so stabilize creates the tables and assigns the global
sequences. Every appended event is written to ``--out`` as one line of
``json.dumps(event.to_dict())`` -- exactly what stabilize's event bus hands a
subscriber.

Events of several workflows are interleaved, so each workflow holds
non-contiguous sequences. Payloads are full of awkward JSON values (big
integers, floats whose text Postgres JSONB rewrites, astral characters,
U+2028, control characters, empty keys, deep nesting). Some events are of
types this stabilize build does not know:

* ``future.thing`` -- written by "a newer build": stabilize's ``Event`` cannot
  carry an unknown type, so these rows are INSERTed with plain SQL on the
  store's own connection, in sequence order with the rest. stabilize reads
  them back as ``EventType.UNKNOWN`` with ``data["_raw_event_type"]``.
* ``unknown.event`` -- an ``EventType.UNKNOWN`` event re-appended by this
  build (as a relay reading the store would), with ``_raw_event_type`` in data.

Some events carry ``schema_version=2`` (replay skips them; they still count).

Usage::

    gen_workflows.py --backend postgres --dsn postgresql://postgres@127.0.0.1:5432/DB \\
        --workflows 300 --seed 1 --out events.ndjson [--disorder]
    gen_workflows.py --backend sqlite --path FILE.db --workflows 50 --seed 2 --out -

``--disorder`` writes every event of a workflow plus ~20% duplicates,
shuffled within each workflow, workflows randomly interleaved; deterministic
from ``--seed``. A one-line JSON summary goes to stderr. Exit status 0 on
success, 1 with a one-line reason on stderr otherwise.

Everything is derived from ``--seed``; ids are also salted with the store's
current maximum sequence, so a fresh database gives identical output for the
same seed and a reused database never mixes new events into old workflows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import float_repr  # tests/python/float_repr.py: the exact tie test

try:
    from stabilize.events import (
        EntityType,
        Event,
        EventMetadata,
        EventType,
        create_stage_event,
        create_task_event,
        create_workflow_event,
    )
except ImportError as exc:  # pragma: no cover - environment problem
    sys.stderr.write(f"gen_workflows: cannot import stabilize ({exc}); use the project's .venv python\n")
    sys.exit(1)

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
UTC = timezone.utc
# Offsets used for Postgres timestamps (timestamptz keeps the instant only).
OFFSETS = [timedelta(0), timedelta(hours=5, minutes=30), timedelta(hours=-8), timedelta(hours=9),
           timedelta(hours=-3, minutes=-30), timedelta(hours=14)]

AWKWARD_INTS = [0, -1, 7, 42, 2**31, 2**53, 9007199254740993, 2**63 - 1, -(2**63), 2**64, 2**64 + 3,
                -(2**70), 10**20, 10**30 + 1]
AWKWARD_FLOATS = [0.1, 0.2, 0.30000000000000004, 1e-07, 1e-05, 0.0001, 0.000123, 1.1, 1.5, -2.25,
                  3.141592653589793, 100.0, 0.0, -0.0, 1234567890123456.7, 1.2345678901234567e16,
                  9999999999999998.0, 1e16, 6.02e23, 1.152921504606847e18, 5e-324, 1e-320,
                  1.7976931348623157e308, -1.7976931348623157e308, 2.5e-3, 123456.789]
# Values whose Python float meaning changes when read back from Postgres JSONB
# (JSONB prints them without a decimal point or drops the sign of zero).
JSONB_DIVERGENT = {1.2345678901234567e16, 1e16, 6.02e23, 1.152921504606847e18,
                   1.7976931348623157e308, -1.7976931348623157e308}
AWKWARD_STRINGS = ["", "x", "plain ascii", "café naïve", "é直接", "😀 astral 𝄞", "line\u2028sep\u2029",
                   'quote " backslash \\ slash /', "\n\r\t\b\f", "ctl \u0001\u001f\u007f", "</script>",
                   "\uffff", "Zürich\u00a0", "مرحبا", "a" * 300, "\\u0000 (text, not a NUL)",
                   "tab\tand\u0085next", "\ufeffbom"]
AWKWARD_KEYS = ["", " ", "a", "A", "aa", "a ", "_", "1", "10", "é", "😀", "\u2028", 'q"k', "back\\slash",
                "\u0001", "Z", "zz", "ключ", "𝄞"]


class Gen:
    """Seeded generator of ids, timestamps and awkward JSON payloads."""

    def __init__(self, seed: int, backend: str, portable_numbers: bool, id_salt: int = 0,
                 tie_floats: bool = False) -> None:
        self.rng = random.Random(seed)
        self.tie_floats = tie_floats
        # Ids come from their own stream, salted with the store's current
        # sequence: a fresh database gives the same ids for the same seed, a
        # reused one never hands out an existing workflow's id again.
        self.id_rng = random.Random(f"ids:{seed}:{id_salt}")
        self.backend = backend
        self.floats = [f for f in AWKWARD_FLOATS
                       if not portable_numbers or (f not in JSONB_DIVERGENT and str(f) != "-0.0")]
        self.ids: set[str] = set()

    def ulid(self, when: datetime) -> str:
        """A ULID-shaped id (26 Crockford chars) from the seeded generator."""
        while True:
            ms = int(when.timestamp() * 1000) & ((1 << 48) - 1)
            value = (ms << 80) | self.id_rng.getrandbits(80)
            text = "".join(CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))
            if text not in self.ids:
                self.ids.add(text)
                return text

    def scalar(self) -> Any:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.choice(AWKWARD_INTS)
        if r < 0.6:
            if self.tie_floats and self.rng.random() < 0.5:
                return self.tie_float()
            return self.rng.choice(self.floats)
        if r < 0.9:
            return self.rng.choice(AWKWARD_STRINGS)
        return self.rng.choice([True, False, None])

    def tie_float(self) -> float:
        """A fresh float whose shortest repr is a tie (k + m/2^n, exactly
        halfway between two shortest candidates), where CPython keeps the
        even last digit."""
        while True:
            p = self.rng.randint(0, 15)
            k = self.rng.randint(10**p, 10 ** (p + 1) - 1)
            room = 52 - k.bit_length()
            if room < 1:
                continue
            n = self.rng.randint(1, min(room, 30))
            x = k + self.rng.randrange(1, 2**n, 2) / 2**n
            if float_repr.is_tie(x, repr(x)):
                return x if self.rng.random() < 0.5 else -x

    def retry_count(self) -> Any:
        """A `retry_count` for task.retried; with tie floats also floats a
        later `+ 1` must print as Python does (ties, and past 1e16)."""
        choices: list[Any] = [0, 3, -1, 2.5, 2**63 - 1]
        if self.tie_floats:
            choices += [self.tie_float(), 9999999999999998.0, 1.2345678901234567e16]
        return self.rng.choice(choices)

    def value(self, depth: int = 0) -> Any:
        r = self.rng.random()
        if depth < 3 and r < 0.15:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        if depth < 3 and r < 0.3:
            return self.obj(depth + 1, self.rng.randint(0, 4))
        return self.scalar()

    def obj(self, depth: int = 0, size: int = 4) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for _ in range(size):
            key = self.rng.choice(AWKWARD_KEYS) if self.rng.random() < 0.5 else f"k{self.rng.randint(0, 40)}"
            out[key] = self.value(depth)
        return out

    def stamp(self, instant: datetime) -> datetime:
        """Render an instant with a random offset (Postgres) or UTC (SQLite)."""
        if self.rng.random() < 0.3:
            instant = instant.replace(microsecond=0)
        if self.backend == "postgres":
            return instant.astimezone(timezone(self.rng.choice(OFFSETS)))
        return instant.astimezone(UTC)


@dataclasses.dataclass
class Spec:
    """One event to append: stabilize type name (may be unknown) and fields."""

    event_type: str
    entity_type: EntityType
    entity_id: str
    data: dict[str, Any]
    schema_version: int = 1


def workflow_script(g: Gen, wf_id: str, start: datetime) -> list[Spec]:
    """The causally ordered events of one workflow (10-40 events)."""
    rng = g.rng
    wf = EntityType.WORKFLOW
    out: list[Spec] = []

    def w(kind: str, data: dict[str, Any], sv: int = 1) -> None:
        out.append(Spec(kind, wf, wf_id, data, sv))

    created = {"application": rng.choice(["billing", "déploiement", "app😀", "etl"]),
               "name": rng.choice(["deploy", "nightly", "név\u2028x", 'q"uote']),
               "type": "PIPELINE", "trigger_type": "manual", "stage_count": 3}
    if rng.random() < 0.1:
        del created["name"]  # absent -> null
    w("workflow.created", created)
    if rng.random() < 0.1:
        w("custom.progress", {"chunk": g.scalar(), "step": 1})
    w("workflow.started", {"start_time": int(start.timestamp() * 1000), "initial_stage_ids": [],
                           "context": g.obj(0, rng.randint(2, 6))})
    for s_no in range(rng.randint(2, 4)):
        st_id = g.ulid(start)
        meta = {"ref_id": f"s{s_no}", "type": rng.choice(["shell", "wait", "deploy"]),
                "name": rng.choice(["Build", "Test ✓", "Déployer", ""])}
        if rng.random() < 0.1:
            meta.pop(rng.choice(list(meta)))

        def s(kind: str, data: dict[str, Any], sv: int = 1) -> None:
            out.append(Spec(kind, EntityType.STAGE, st_id, data, sv))

        first = rng.random()
        if first < 0.08:  # first event of the stage has an unknown type
            s("future.thing", {**meta, "payload": g.value()})
        elif first < 0.14:
            s("custom.progress", {**meta, "message": rng.choice(AWKWARD_STRINGS)})
        elif first < 0.20:  # skipped by replay: the stage entry comes from the next event
            s("stage.started", {"ref_id": "from-v2", "type": "v2", "name": "v2"}, sv=2)
        elif first < 0.24:
            s("unknown.event", {"_raw_event_type": "future.relayed", "ref_id": "relay"})
        s("stage.started", {**meta, "start_time": 1, "is_synthetic": False, "parent_stage_id": None})
        if rng.random() < 0.15:
            s("context.updated", {"context": g.obj(1, 2)})  # stage-level context: ignored by replay
        for t_no in range(rng.choice([0, 1, 1, 2, 2, 3])):
            t_id = g.ulid(start)

            def t(kind: str, data: dict[str, Any], sv: int = 1) -> None:
                out.append(Spec(kind, EntityType.TASK, t_id, data, sv))

            tname = rng.choice(["run", "wait", "task ✓", "\u0001ctl"])
            if rng.random() < 0.05:  # first event of the task is not task.started
                t(rng.choice(["custom.progress", "future.thing"]), {"name": "early", "stage_id": st_id})
            t("task.started", {"name": tname, "implementing_class": "x.Y", "start_time": 5, "stage_id": st_id})
            for _ in range(rng.choice([0, 0, 0, 1, 2])):
                if rng.random() < 0.4:
                    t("task.retried", {"name": tname, "retry_count": g.retry_count()})
                else:
                    t("task.retried", {"name": tname, "attempt": 2, "last_error": g.scalar()})
            if rng.random() < 0.2:
                t("custom.progress", {"tokens": g.value()})
            if rng.random() < 0.05:
                t("future.thing", {"x": g.value()})
            if rng.random() < 0.08:
                t("task.completed", {"status": "IGNORED", "outputs": {"v2": True}}, sv=2)
            end = rng.random()
            if end < 0.6:
                data: dict[str, Any] = {"name": tname, "status": "SUCCEEDED", "outputs": g.obj(0, rng.randint(0, 5))}
                if rng.random() < 0.2:
                    del data["outputs"]
                if rng.random() < 0.2:
                    del data["status"]
                t("task.completed", data)
            elif end < 0.85:
                data = {"name": tname, "status": "TERMINAL", "error": rng.choice(AWKWARD_STRINGS),
                        "exception_details": g.value()}
                if rng.random() < 0.3:
                    del data["error"]
                if rng.random() < 0.2:
                    data["status"] = None
                t("task.failed", data)
        end = rng.random()
        if end < 0.1:
            s("stage.suspended", {**meta, "signal_name": "approve"})
            s("stage.resumed", {**meta})
            end = 0.0
        if end < 0.55:
            data = {**meta, "status": rng.choice(["SUCCEEDED", "FAILED_CONTINUE", None]),
                    "outputs": g.obj(0, rng.randint(0, 5))}
            if rng.random() < 0.3:
                del data["status"]
            if rng.random() < 0.15:
                del data["outputs"]
            s("stage.completed", data)
        elif end < 0.7:
            data = {**meta, "status": "TERMINAL", "error": g.value()}
            if rng.random() < 0.3:
                del data["error"]
            if rng.random() < 0.3:
                del data["status"]
            s("stage.failed", data)
        elif end < 0.8:
            s("stage.skipped", {**meta, "reason": rng.choice(AWKWARD_STRINGS + [None])})
        elif end < 0.87:
            s("stage.canceled", {**meta})
        elif end < 0.92:
            s("stage.suspended", {**meta})
        # else: stage left running
        if rng.random() < 0.5:
            w("context.updated", {"context": g.obj(0, rng.randint(1, 4))})
        if rng.random() < 0.08:
            w("outputs.updated", {"outputs": g.obj(0, 2)})
        if rng.random() < 0.15:
            w("workflow.paused", {"paused_by": "ops", "pause_time": 1})
            if rng.random() < 0.8:
                w("workflow.resumed", {"resume_time": 2, "paused_ms": 1})
    if rng.random() < 0.1:
        w("future.thing", {"status": "NOT-APPLIED", "v": g.value()})
    if rng.random() < 0.1:
        w("workflow.failed", {"status": "SKIPPED-BY-V2"}, sv=2)
    end = rng.random()
    if end < 0.45:
        data = {"status": "SUCCEEDED", "end_time": 9, "duration_ms": 8}
        r = rng.random()
        if r < 0.3:
            del data["status"]
        elif r < 0.5:
            data["status"] = None
        w("workflow.completed", data)
    elif end < 0.7:
        data = {"status": "TERMINAL", "error": g.value(), "end_time": 9}
        r = rng.random()
        if r < 0.3:
            del data["status"]
        elif r < 0.5:
            data["status"] = None
        w("workflow.failed", data)
    elif end < 0.82:
        w("workflow.canceled", {"canceled_by": "ops", "reason": rng.choice(AWKWARD_STRINGS), "end_time": 9})
    # else: still running
    if rng.random() < 0.2:
        w("context.updated", {"context": g.obj(0, 2)})  # after the end, still folded
    return out


def build_event(g: Gen, spec: Spec, wf_id: str, version: int, causation: str | None, when: datetime) -> Event:
    """A stabilize Event for a known type (via the create_*_event helpers)."""
    etype = EventType(spec.event_type)
    meta = EventMetadata(correlation_id=wf_id, causation_id=causation, actor="gen_workflows",
                         source_handler="GenHandler")
    if spec.entity_type is EntityType.WORKFLOW:
        ev = create_workflow_event(etype, wf_id, version, spec.data, meta)
    elif spec.entity_type is EntityType.STAGE:
        ev = create_stage_event(etype, spec.entity_id, wf_id, version, spec.data, meta)
    else:
        ev = create_task_event(etype, spec.entity_id, wf_id, version, spec.data, meta)
    return dataclasses.replace(ev, event_id=g.ulid(when), timestamp=g.stamp(when),
                               schema_version=spec.schema_version)


RAW_INSERT = """INSERT INTO events (event_id, event_type, timestamp, entity_type, entity_id, workflow_id,
  version, data, correlation_id, causation_id, actor, source_handler, schema_version)
  VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})"""


class Appender:
    """Appends through stabilize's store on one connection; raw SQL for unknown types."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.backend = args.backend
        if args.backend == "postgres":
            from stabilize.events.store.postgres import PostgresEventStore

            self.store = PostgresEventStore(args.dsn, create_tables=True)
            self._ctx = self.store._pool.connection()  # the store's own pool
            self.conn = self._ctx.__enter__()
            self.raw_sql = RAW_INSERT.format(p="%s") + " RETURNING sequence"
        else:
            from stabilize.events.store.sqlite import SqliteEventStore

            self.store = SqliteEventStore("sqlite:///" + os.path.abspath(args.path), create_tables=True)
            self.conn = self.store._get_connection()
            self.raw_sql = RAW_INSERT.format(p="?")

    def append(self, events: list[Event]) -> list[Event]:
        return self.store.append_batch(events, connection=self.conn) if events else []

    def append_raw(self, ev: Event, raw_type: str) -> int:
        m = ev.metadata
        ts: Any = ev.timestamp if self.backend == "postgres" else ev.timestamp.isoformat()
        params = (ev.event_id, raw_type, ts, ev.entity_type.value, ev.entity_id, ev.workflow_id, ev.version,
                  json.dumps(ev.data), m.correlation_id, m.causation_id, m.actor, m.source_handler,
                  ev.schema_version)
        if self.backend == "postgres":
            with self.conn.cursor() as cur:
                cur.execute(self.raw_sql, params)
                return int(cur.fetchone()["sequence"])
        return int(self.conn.execute(self.raw_sql, params).lastrowid)

    def current_sequence(self) -> int:
        """The highest sequence in the events table (0 when empty), on our connection."""
        row = self.conn.execute("SELECT COALESCE(MAX(sequence), 0) AS m FROM events").fetchone()
        return int(row["m"] if isinstance(row, dict) else row[0])

    def commit(self) -> None:
        self.conn.commit()

    def close(self, ok: bool) -> None:
        if self.backend == "postgres":
            if not ok:
                self.conn.rollback()
            self._ctx.__exit__(None, None, None)
            self.store.close()
        elif not ok:
            self.conn.rollback()


def generate(args: argparse.Namespace) -> tuple[list[list[dict[str, Any]]], int]:
    """Append all workflows; return each workflow's event dicts (sequence order) and the count."""
    app = Appender(args)
    ok = False
    try:
        g = Gen(args.seed, args.backend, args.portable_numbers, app.current_sequence(), args.tie_floats)
        rng = g.rng
        clock = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 300 * 86400),
                                                             microseconds=rng.randint(0, 999999))
        scripts: list[tuple[str, list[Spec]]] = []
        for _ in range(args.workflows):
            wf_id = g.ulid(clock)
            scripts.append((wf_id, workflow_script(g, wf_id, clock)))
        per_wf: list[list[dict[str, Any]]] = [[] for _ in scripts]
        active: list[int] = []
        next_wf, cursor = 0, [0] * len(scripts)
        versions: dict[str, int] = {}
        last_id: dict[str, str] = {}
        batch: list[tuple[int, Event, str | None]] = []  # (workflow index, event, raw type or None)
        total = 0

        def flush_batch() -> None:
            native: list[tuple[int, Event]] = []

            def push_native() -> None:
                for (wi, _), rec in zip(native, app.append(list(e for _, e in native))):
                    per_wf[wi].append(rec.to_dict())
                native.clear()

            for wi, ev, raw in batch:
                if raw is None:
                    native.append((wi, ev))
                    continue
                push_native()
                seq = app.append_raw(ev, raw)
                d = ev.with_sequence(seq).to_dict()
                d["event_type"] = raw  # what the newer build that wrote it would publish
                per_wf[wi].append(d)
            push_native()
            batch.clear()
            app.commit()

        while next_wf < len(scripts) or active:
            while next_wf < len(scripts) and len(active) < args.concurrency:
                active.append(next_wf)
                next_wf += 1
            wi = rng.choice(active)
            wf_id, script = scripts[wi]
            spec = script[cursor[wi]]
            cursor[wi] += 1
            if cursor[wi] == len(script):
                active.remove(wi)
            clock += timedelta(milliseconds=rng.randint(0, 4000), microseconds=rng.randint(0, 999))
            vkey = f"{spec.entity_type.value}/{spec.entity_id}"
            versions[vkey] = versions.get(vkey, 0) + 1
            known = spec.event_type in EventType._value2member_map_
            base = Spec("custom.progress", spec.entity_type, spec.entity_id, spec.data, spec.schema_version)
            ev = build_event(g, spec if known else base, wf_id, versions[vkey], last_id.get(wf_id), clock)
            if not known:
                ev = dataclasses.replace(ev, event_type=EventType.UNKNOWN)
            last_id[wf_id] = ev.event_id
            batch.append((wi, ev, None if known else spec.event_type))
            total += 1
            if len(batch) >= 1000:
                flush_batch()
        flush_batch()
        ok = True
    finally:
        app.close(ok)
    return per_wf, total


def order_lines(per_wf: list[list[dict[str, Any]]], disorder: bool, seed: int) -> list[dict[str, Any]]:
    """Sequence order, or the --disorder order (shuffled per workflow, ~20% duplicates)."""
    if not disorder:
        return sorted((e for evs in per_wf for e in evs), key=lambda e: e["sequence"])
    rng = random.Random(seed ^ 0x5EED)
    queues: list[list[dict[str, Any]]] = []
    for evs in per_wf:
        q = list(evs) + [rng.choice(evs) for _ in range(round(len(evs) * 0.2))] if evs else []
        rng.shuffle(q)
        queues.append(q)
    slots = [i for i, q in enumerate(queues) for _ in q]
    rng.shuffle(slots)
    pos = [0] * len(queues)
    out = []
    for i in slots:
        out.append(queues[i][pos[i]])
        pos[i] += 1
    return out


def write_lines(out: Any, lines: list[dict[str, Any]]) -> None:
    """One ``json.dumps(event.to_dict())`` per line."""
    for e in lines:
        out.write(json.dumps(e) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["postgres", "sqlite"], required=True)
    p.add_argument("--dsn", help="PostgreSQL URL (with --backend postgres)")
    p.add_argument("--path", help="SQLite database file (with --backend sqlite)")
    p.add_argument("--workflows", type=int, default=100, help="number of workflows (default 100)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--out", required=True, help="NDJSON output file, '-' for stdout")
    p.add_argument("--disorder", action="store_true",
                   help="shuffle each workflow's events and add ~20%% duplicates")
    p.add_argument("--concurrency", type=int, default=12,
                   help="workflows interleaved at a time (default 12)")
    p.add_argument("--portable-numbers", action="store_true",
                   help="omit floats whose value Postgres JSONB changes (-0.0, floats >= 1e16)")
    p.add_argument("--tie-floats", action="store_true",
                   help="also fill payloads with floats whose shortest repr is a tie (round-half-even)")
    args = p.parse_args(argv)
    if args.backend == "postgres" and not args.dsn:
        p.error("--backend postgres needs --dsn")
    if args.backend == "sqlite" and not args.path:
        p.error("--backend sqlite needs --path")
    if args.workflows < 1 or args.concurrency < 1:
        p.error("--workflows and --concurrency must be >= 1")
    if args.backend == "postgres":
        import psycopg

        try:
            psycopg.connect(args.dsn, connect_timeout=5).close()
        except Exception as exc:
            sys.stderr.write(f"gen_workflows: cannot connect to {args.dsn}: {str(exc).strip().splitlines()[0]}\n")
            return 1
    started = time.monotonic()
    try:
        per_wf, total = generate(args)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (same --seed twice into one database? use another seed)" if "event_id" in str(exc) else ""
        sys.stderr.write(f"gen_workflows: append failed: {type(exc).__name__}: {msg}{hint}\n")
        return 1
    lines = order_lines(per_wf, args.disorder, args.seed)
    try:
        if args.out == "-":
            write_lines(sys.stdout, lines)
        else:
            with open(args.out, "w", encoding="utf-8") as out:
                write_lines(out, lines)
    except OSError as exc:
        sys.stderr.write(f"gen_workflows: cannot write {args.out}: {exc}\n")
        return 1
    summary = {"workflows": args.workflows, "events": total, "lines": len(lines),
               "max_sequence": max((e["sequence"] for e in lines), default=0),
               "backend": args.backend, "disorder": args.disorder,
               "seconds": round(time.monotonic() - started, 2)}
    sys.stderr.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
