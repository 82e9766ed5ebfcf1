#!/usr/bin/env python3
"""A steady load of stabilize-shaped events into a PostgreSQL `events` table.

For measuring the table feed's lag: every tick (50 ms) one transaction
COPYs `rate / 20` events, round-robin over `--workflows` workflows, each
`context.updated` with a payload of about 600 bytes, stamped with the time
the transaction starts (stabilize stamps an event when it records it, just
before the commit; a tick's transaction takes a few milliseconds). The table
must exist (let stabilize create it). Prints one JSON line: events written,
seconds, achieved rate, ticks that overran.

    feed_load.py --dsn URL --rate 20000 --seconds 30 [--workflows 2000]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

import psycopg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--rate", type=int, default=20000, help="events per second")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--workflows", type=int, default=2000)
    args = p.parse_args()
    tick = 0.05
    per_tick = max(1, int(args.rate * tick))
    payload = json.dumps({"context": {"note": "x" * 540, "n": 0}})
    written, overruns, versions = 0, 0, [0] * args.workflows
    with psycopg.connect(args.dsn, autocommit=False) as conn:
        started = time.monotonic()
        next_tick = started
        n = 0
        while time.monotonic() - started < args.seconds:
            stamp = datetime.now(timezone.utc)
            with conn.cursor() as cur:
                with cur.copy(
                    "COPY events (event_id, event_type, timestamp, entity_type, entity_id, "
                    "workflow_id, version, data, correlation_id) FROM STDIN"
                ) as copy:
                    for _ in range(per_tick):
                        w = n % args.workflows
                        versions[w] += 1
                        wid = f"LOADWF{w:020d}"
                        copy.write_row((f"LOADEV{n:020d}", "context.updated", stamp, "workflow",
                                        wid, wid, versions[w], payload, "c"))
                        n += 1
            conn.commit()
            written += per_tick
            next_tick += tick
            pause = next_tick - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                overruns += 1
        took = time.monotonic() - started
    print(json.dumps({"events": written, "seconds": round(took, 2),
                      "rate": round(written / took), "overran_ticks": overruns}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
