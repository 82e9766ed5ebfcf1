"""CPython's float repr, the oracle of the differential test.

Reads one double per line as 16 hex digits of its IEEE-754 bits, writes one
line per double: `repr(x)`, a space, and `1` if x lies exactly halfway
between its shortest digits and a neighbour of the same length that also
reads back as x (a tie CPython settles to the even digit), else `0`.

The tie flag is computed here, independently of the Rust side, with exact
decimal arithmetic, so the test can say how many ties it really compared.
"""

import decimal
import struct
import sys

EXACT = decimal.Context(prec=2000)


def is_tie(x: float, text: str) -> bool:
    if x == 0.0:
        return False
    exact = decimal.Decimal(abs(x))  # the double's exact value
    # A tie is a midpoint of two decimals of n digits: n + 1 digits at most,
    # where n <= 17. Anything longer is no tie.
    if len(exact.normalize(EXACT).as_tuple().digits) > 18:
        return False
    shown = decimal.Decimal(text.lstrip("-")).normalize(EXACT)
    ulp = decimal.Decimal((0, (1,), shown.as_tuple().exponent))
    diff = EXACT.subtract(exact, shown)
    if EXACT.multiply(abs(diff), 2) != ulp:
        return False
    neighbour = EXACT.add(shown, ulp) if diff > 0 else EXACT.subtract(shown, ulp)
    return neighbour != 0 and float(neighbour) == abs(x)


def main() -> None:
    unpack = struct.Struct(">d").unpack
    out = sys.stdout
    for line in sys.stdin:
        x = unpack(bytes.fromhex(line.strip()))[0]
        text = repr(x)
        out.write(f"{text} {1 if is_tie(x, text) else 0}\n")
    out.flush()


if __name__ == "__main__":
    main()
