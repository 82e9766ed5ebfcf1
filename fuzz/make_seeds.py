#!/usr/bin/env python3
"""Build fuzz/seeds/ from real stabilize events (how the committed seeds were made).

Inputs are files written by tests/python/gen_workflows.py --out (one
``Event.to_dict()`` per line: stabilize's own events, SQLite ones in UTC,
Postgres ones with offsets) and the canonical JSON vectors, whose inputs
become event payloads. Output:

* ``seeds/decode/``: one frame a file -- events of every type and entity
  type, events carrying each awkward vector payload, and commands;
* ``seeds/reducers/``: one workflow's event stream a file (in order, or
  duplicated and shuffled with --disorder), a few of them interleaved.

Files are named by the SHA-1 of their content, as libFuzzer names its own.

    make_seeds.py --events a.ndjson b.ndjson --vectors ../shared/vectors/canonical_json.jsonl \\
        tests/vectors/floats.jsonl --out fuzz/seeds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from collections import defaultdict

COMMANDS = [
    {"op": "ping"},
    {"op": "stats"},
    {"op": "flush"},
    {"op": "flush", "snapshot": True},
    {"op": "sync"},
    {"op": "get", "entity_type": "workflow", "entity_id": "01KVZSSZ4V4HSAK77W6WV4VDFE"},
    {"op": "snapshot", "entity_type": "workflow", "entity_id": "01KVZSSZ4V4HSAK77W6WV4VDFE"},
]


def write(out_dir: str, data: bytes) -> int:
    os.makedirs(out_dir, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(out_dir, name), "wb") as f:
        f.write(data)
    return len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", nargs="+", required=True, help="gen_workflows.py --out files")
    ap.add_argument("--vectors", nargs="*", default=[], help="canonical JSON vector files (JSONL)")
    ap.add_argument("--out", required=True, help="the seeds directory")
    ap.add_argument("--single", type=int, default=110, help="single-event seeds")
    ap.add_argument("--payloads", type=int, default=40, help="events carrying a vector payload")
    ap.add_argument("--streams", type=int, default=30, help="workflow stream seeds")
    ap.add_argument("--max-stream-bytes", type=int, default=8_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--extra-streams", nargs="*", default=[], help="regression inputs for reducers")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    files = [[line for line in open(path, encoding="utf-8") if line.strip()] for path in args.events]
    lines = [line.rstrip("\n") for f in files for line in f]

    # Single events: round-robin over (entity_type, event_type, schema_version)
    # so every kind is represented, then fill with random others.
    by_kind: dict[tuple, list[str]] = defaultdict(list)
    for line in lines:
        e = json.loads(line)
        by_kind[(e["entity_type"], e["event_type"], e.get("schema_version", 1))].append(line)
    chosen: list[str] = []
    while len(chosen) < args.single and any(by_kind.values()):
        for kind in sorted(by_kind):
            if by_kind[kind] and len(chosen) < args.single:
                chosen.append(by_kind[kind].pop(rng.randrange(len(by_kind[kind]))))
    decode_dir = os.path.join(args.out, "decode")
    total = sum(write(decode_dir, line.encode()) for line in chosen)

    # Awkward payloads from the vectors, each as the data of a real event.
    payloads = []
    for path in args.vectors:
        for line in open(path, encoding="utf-8"):
            text = json.loads(line)["input"]
            if text.lstrip().startswith("{"):
                payloads.append(text)
    rng.shuffle(payloads)
    templates = [json.loads(l) for l in lines if '"context.updated"' in l or '"task.retried"' in l]
    for text in payloads[: args.payloads]:
        event = rng.choice(templates)
        body = json.dumps({k: v for k, v in event.items() if k != "data"})
        key = "context" if event["event_type"] == "context.updated" else "retry_count"
        # Spliced as text: the vector's exact number literals stay as written.
        if key == "context":
            data = '{"context": ' + text + "}"
        else:
            data = text
        total += write(decode_dir, (body[:-1] + ', "data": ' + data + "}").encode())
    for command in COMMANDS:
        total += write(decode_dir, json.dumps(command).encode())

    # Streams: whole workflows, in the order their file has them.
    streams: list[list[str]] = []
    for f in files:
        per_wf: dict[str, list[str]] = defaultdict(list)
        for line in f:
            per_wf[json.loads(line)["workflow_id"]].append(line.rstrip("\n"))
        streams.extend(per_wf.values())
    rng.shuffle(streams)
    reducers_dir = os.path.join(args.out, "reducers")
    made = 0
    for stream in streams:
        # A workflow's first events, up to the size (libFuzzer is faster on
        # small inputs; the rules are per event, the order is what matters).
        kept, size = [], 0
        for line in stream:
            if size + len(line) + 1 > args.max_stream_bytes and kept:
                break
            kept.append(line)
            size += len(line) + 1
        total += write(reducers_dir, ("\n".join(kept) + "\n").encode())
        made += 1
        if made >= args.streams:
            break
    # Two interleaved workflows, as a socket sees them.
    for a, b in zip(streams[made : made + 6 : 2], streams[made + 1 : made + 6 : 2]):
        merged = [x for pair in zip(a, b) for x in pair] + a[len(b):] + b[len(a):]
        text = "\n".join(merged) + "\n"
        total += write(reducers_dir, text[: args.max_stream_bytes].rsplit("\n", 1)[0].encode() + b"\n")
    for path in args.extra_streams:
        total += write(reducers_dir, open(path, "rb").read())
    print(json.dumps({"bytes": total, "decode": len(os.listdir(decode_dir)),
                      "reducers": len(os.listdir(reducers_dir))}))


if __name__ == "__main__":
    main()
