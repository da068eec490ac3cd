"""The obfuscator table's window, measured: build time and time per power for each width.

For a fresh 2048-bit key it builds the DJN table with windows of 8 to 12 bits
(``deltaml.protocol.powers.FixedBase``), times ``--powers`` obfuscators with
each, and prints what a party that draws 4,400 (the demo's trainer) or 44,000
(the same trainer over 1,000 rounds) would spend, the build included, next to
the window ``window_for`` picks for it.

    python benchmarks/windows.py [--powers 2000]
"""

from __future__ import annotations

import argparse
import random
import time

from deltaml.protocol.paillier import generate_keypair
from deltaml.protocol.powers import WINDOWS, FixedBase, window_for
from deltaml.protocol.randomness import djn_exponent_bits, djn_hs

USES = (4_400, 44_000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--powers", type=int, default=2000)
    args = ap.parse_args()
    if args.powers < 1:
        ap.error(f"--powers {args.powers}: at least one power to time")
    pub, _ = generate_keypair(2048)
    bits, base, rng = djn_exponent_bits(pub.n), djn_hs(pub.n), random.Random(0)
    print(f"{'window':>6}{'build (s)':>11}{'a power (ms)':>14}" + "".join(f"{f'{u:,} uses + build (s)':>26}" for u in USES))
    for window in range(8, 13):
        start = time.perf_counter()
        table = FixedBase(base, pub.nsquare, bits, window)
        build = time.perf_counter() - start
        xs = [rng.getrandbits(bits) for _ in range(args.powers)]
        start = time.perf_counter()
        for x in xs:
            table.pow(x)
        each = (time.perf_counter() - start) / len(xs)
        print(f"{window:>6}{build:>11.3f}{each * 1e3:>14.3f}" + "".join(f"{u * each + build:>26.2f}" for u in USES))
    print("window_for picks " + ", ".join(f"{window_for(u, bits)} bits for {u:,}" for u in USES)
          + f" (widest allowed: {max(WINDOWS)})")


if __name__ == "__main__":
    main()
