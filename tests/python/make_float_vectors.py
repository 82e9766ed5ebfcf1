#!/usr/bin/env python3
"""Make the project's own float test vectors with real CPython and Postgres.

Writes ``tests/vectors/floats.jsonl`` in the format of
``../shared/vectors/canonical_json.jsonl`` (``input``, ``jsonb``,
``canonical``, ``sha256``), plus ``python_canonical``: what stabilize's
SQLite path hashes, where the event text is read by ``json.loads`` without
Postgres in between. Each line holds one float (or big integer) under ``x``.

The floats: ties (doubles exactly halfway between two shortest digit
strings, where CPython keeps the even digit) found the way
``tests/it/float_repr.rs`` finds them, and every boundary of the rendering:
the exponent switches at 1e16 and 1e-4, subnormals, ``-0.0``, ``5e-324``,
the largest double, integers past 64 bits.

Usage::

    make_float_vectors.py --dsn postgresql://postgres@127.0.0.1:5432/test [--out FILE]

Deterministic for a given seed; re-run it only to add cases, and review the
diff (the file is test data, not a build product).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import struct

import psycopg

import float_repr


def tie_floats(rng: random.Random, count: int) -> list[float]:
    found: list[float] = []
    while len(found) < count:
        kind = rng.random()
        if kind < 0.6:  # k + m/2^n near a power of ten
            p = rng.randint(0, 15)
            k = rng.randint(10**p, 10 ** (p + 1) - 1)
            room = 52 - k.bit_length()
            if room < 1:
                continue
            n = rng.randint(1, min(room, 30))
            x = k + rng.randrange(1, 2**n, 2) / 2**n
        else:  # a 53-bit integer times a power of two: past 2^53, or tiny
            x = math.ldexp(rng.getrandbits(53) | 1, rng.randint(-70, 70))
        if float_repr.is_tie(x, repr(x)) and x not in found:
            found.append(x)
    return found


def neighbours(x: float, span: int = 2) -> list[float]:
    bits = struct.unpack(">Q", struct.pack(">d", x))[0]
    out = []
    for d in range(-span, span + 1):
        if bits + d < 0:
            continue
        y = struct.unpack(">d", struct.pack(">Q", bits + d))[0]
        if math.isfinite(y) and y >= 0:
            out.append(y)
    return out


def boundaries() -> list[float]:
    centres = [1e16, 1e-4, 1e-5, 1e15, 9999999999999998.0, 5e-324, 2.2250738585072014e-308,
               1.7976931348623157e308, 2.0**53, 2.0**63, 2.0**64, 1e22, 1e23, 0.1, 1.0]
    out = [0.0, -0.0]
    for c in centres:
        out.extend(neighbours(c))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", required=True)
    p.add_argument("--out", default="tests/vectors/floats.jsonl")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--ties", type=int, default=120)
    args = p.parse_args()
    rng = random.Random(args.seed)
    numbers: list[object] = [
        902641992789.7812, 2871642526.7695312, 22314070637.039062,
        580296851639.5312, 2195540085417.7812, 1758851603822326.2,
    ]
    numbers += tie_floats(rng, args.ties)
    numbers += [x for b in boundaries() for x in (b, -b)]
    numbers += [2**64, -(2**64) - 1, 10**30 + 7, -(2**63), 2**63 - 1]
    with psycopg.connect(args.dsn) as conn, open(args.out, "w", encoding="utf-8") as out:
        for x in numbers:
            text = json.dumps({"x": x})
            jsonb = conn.execute("SELECT %s::jsonb::text", (text,)).fetchone()[0]
            back = json.loads(jsonb)  # as stabilize's psycopg loader reads it
            canonical = json.dumps(back, sort_keys=True, default=str)
            python_canonical = json.dumps(json.loads(text), sort_keys=True, default=str)
            out.write(json.dumps({
                "input": text,
                "jsonb": jsonb,
                "canonical": canonical,
                "sha256": hashlib.sha256(canonical.encode()).hexdigest(),
                "python_canonical": python_canonical,
                "tie": isinstance(x, float) and float_repr.is_tie(x, repr(x)),
            }) + "\n")


if __name__ == "__main__":
    main()
