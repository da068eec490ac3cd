"""Many modular powers at once: fixed-base tables and multi-exponentiation.

Pure arithmetic on ``gmpy2`` integers, with no notion of keys beyond a modulus
(``pub.nsquare`` where a public key is passed): :class:`FixedBase` serves the
DJN obfuscators (:mod:`deltaml.protocol.randomness`), :class:`MatrixPowers` the
trainers' products ``G[w]`` and the aggregator's steps, :func:`multi_power` a
single combination such as a validator's metric.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gmpy2
import numpy as np

if TYPE_CHECKING:
    from .paillier import PublicKey


class FixedBase:
    """``base**x mod modulus`` for many ``x`` through a table of ``base**(d * 2**(window * i))``:
    one multiplication per non-zero ``window``-bit digit of ``x``. A wider window takes fewer
    multiplications a power (128 at 8 bits for a 1024-bit ``x``, 103 at 10) from a table whose
    size, and cost to build, doubles with each bit (:func:`window_for` weighs the two)."""

    def __init__(self, base, modulus, exponent_bits: int, window: int = 8) -> None:
        if not 1 <= window <= 16:  # (16 bits would be a 2 GB table: the protocol's choice stops at 10)
            raise ValueError(f"a table window of {window} bits: expected 1 to 16")
        self.modulus = gmpy2.mpz(modulus)
        self.window = window
        self.rows = []
        step = gmpy2.mpz(base) % self.modulus
        for _ in range(-(-exponent_bits // window)):
            row = [gmpy2.mpz(1), step]
            for _ in range((1 << window) - 2):
                row.append(row[-1] * step % self.modulus)
            self.rows.append(row)
            step = row[-1] * step % self.modulus  # base ** (2 ** (window * (i + 1)))
        self.width = len(self.rows) * window  # the longest exponent served, in bits

    def pow(self, x: int):
        """``base**x`` for ``0 <= x < 2**width``."""
        x = int(x)
        if x < 0 or x >> self.width:
            raise ValueError(f"exponent outside [0, 2**{self.width})")
        acc = gmpy2.mpz(1)
        mod, window, mask = self.modulus, self.window, (1 << self.window) - 1
        for row in self.rows:
            digit = x & mask
            if digit:
                acc = acc * row[digit] % mod
            x >>= window
        return acc


#: The table windows :func:`window_for` chooses from. At 10 bits a table for a 1024-bit exponent
#: modulo a 4096-bit ``n**2`` holds 103 x 1023 numbers of 512 bytes (54 MB; at 8 bits 16 MB).
WINDOWS = range(4, 11)
#: The window of a table built with no count of its uses in view (the choice for a few thousand).
DEFAULT_WINDOW = 8


def window_for(uses: int, exponent_bits: int) -> int:
    """The table window that makes ``uses`` powers of ``exponent_bits`` bits cheapest, the table
    included: ``ceil(exponent_bits / w)`` multiplications a power, and as many rows of ``2**w - 1``
    products to build (a multiplication either way). For a 1024-bit exponent: 8 bits from 735
    powers to 1,828, 9 to 4,282, 10 beyond; fewer than 735, 7 bits down to 4."""
    return min(WINDOWS, key=lambda w: -(-exponent_bits // w) * (max(0, uses) + (1 << w)))


#: A 4096-bit modular inversion costs about four multiplications modulo ``n**2`` (gmpy2, measured).
INVERT_COST = 4


class MatrixPowers:
    """``[M x]`` for a fixed signed integer matrix ``M`` and many encrypted vectors ``[x]``.

    Row ``k`` of the result is ``prod_j [x_j]**M_kj``, a multi-exponentiation
    over the same bases for every row. The bases are split into groups of
    ``group`` and each group gets a table of all subset products; a row then
    costs one squaring per bit of its largest entry plus one multiplication per
    non-empty group and bit, instead of a full square-and-multiply per entry
    (Straus' method). The bit schedule depends only on ``M`` and is worked out once.

    Negative entries are handled one of two ways, whichever multiplies less for
    this ``M`` (``signs="auto"``):

    - ``"inverses"``: the bases of negative entries are inverted and get tables
      of their own, so a bit of a row with both signs costs a multiplication
      from each table (a single row like the aggregator's ``[2**64, -eta]``);
    - ``"offsets"``: ``o_j``, the largest ``-M_kj`` of column ``j``, is added to
      the column, so that every entry is non-negative, and ``z = prod_j [x_j]**o_j``
      is computed as one more row; row ``k`` is then ``y_k * z**-1``, one inversion
      for the whole vector (a Gram matrix, whose rows each have a few negative
      entries: 8-17% fewer counted multiplications for the demo's trainers, and
      15-30% less time, as the inversions it saves cost more than counted).

    Both give the same integers modulo ``n**2``, so the choice never shows in a ciphertext.
    """

    SIGNS = ("auto", "inverses", "offsets")

    def __init__(self, rows, group: int = 6, signs: str = "auto") -> None:
        if signs not in self.SIGNS:
            raise ValueError(f"signs must be one of {self.SIGNS}, got {signs!r}")
        rows = [[int(k) for k in row] for row in rows]
        self.width = len(rows[0]) if rows else 0
        if any(len(row) != self.width for row in rows):
            raise ValueError("matrix rows of unequal length")
        self.groups = [range(s, min(s + group, self.width)) for s in range(0, self.width, group)]
        plans = [] if signs == "offsets" else [(*self._plan(rows), False)]
        offsets = [max(0, -min(column)) for column in zip(*rows)]
        if signs != "inverses" and (any(offsets) or not plans):
            plans.append((*self._plan([[k + o for k, o in zip(row, offsets)] for row in rows] + [offsets]), True))
        # multiplications for one vector, an inversion counted as INVERT_COST
        costs = [self._cost(inverted, subsets) + (INVERT_COST + len(rows) if offset else 0)
                 for inverted, subsets, offset in plans]
        self.cost = min(costs)
        self.inverted, subsets, self.offset = plans[costs.index(self.cost)]
        self.schedule = [_steps(pos, neg) for pos, neg in subsets]  # only the plan taken: half the work

    def __deepcopy__(self, memo) -> "MatrixPowers":
        return self  # nothing in it changes after construction

    def _plan(self, rows: list[list[int]]) -> tuple[list[list[int]], list]:
        """The bases to invert (only one with a negative entry in some row) and every row's subsets."""
        negative = {j for row in rows for j, k in enumerate(row) if k < 0}
        inverted = [[j for j in members if j in negative] for members in self.groups]
        return inverted, [self._row_subsets(row, inverted) for row in rows]

    def _cost(self, inverted: list[list[int]], subsets: list) -> int:
        """Multiplications for the tables and the rows of one vector: a squaring per step, and a
        multiplication per non-empty subset."""
        tables = sum(2 ** len(g) for g in self.groups) + sum(2 ** len(i) + INVERT_COST * len(i)
                                                             for i in inverted if i)
        steps = sum(len(pos) + int(np.count_nonzero(pos)) + int(np.count_nonzero(neg)) for pos, neg in subsets)
        return tables + steps

    def _row_subsets(self, row: list[int], inverted: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """One step per bit of the row's largest entry, the highest first, and for each step and
        group the subset of the group's positive bases and of its inverted bases whose entries
        have that bit set (``bits x groups`` arrays of subset numbers).

        The bits of the row form a 0/1 matrix (entries x bits, from their binary digits), and the
        subsets are that matrix times the bases' weights in their subsets: one matrix product
        instead of a Python test per entry and bit (a 100-owner job's trainers spent 40 ms each on
        it when they took their role, at d = 21)."""
        bits = max((abs(k).bit_length() for k in row), default=0)
        if not bits:  # a row of zeros: no steps
            return np.zeros((0, len(self.groups)), dtype=np.int64), np.zeros((0, len(self.groups)), dtype=np.int64)
        positive = np.zeros((len(row), len(self.groups)), dtype=np.int64)
        negative = np.zeros_like(positive)
        digits = "".join(format(abs(k), f"0{bits}b") for k in row).encode()
        set_bits = (np.frombuffer(digits, dtype=np.uint8) - ord("0")).reshape(len(row), bits).astype(np.int64)
        for g, members in enumerate(self.groups):
            for p, j in enumerate(members):
                if row[j] > 0:
                    positive[j, g] = 1 << p
                elif row[j] < 0:
                    negative[j, g] = 1 << inverted[g].index(j)
        return set_bits.T @ positive, set_bits.T @ negative

    def apply(self, pub: "PublicKey", cs) -> list:
        """``[M x]`` from ``[x]`` under ``pub``."""
        if len(cs) != self.width:
            raise ValueError(f"expected {self.width} ciphertexts, got {len(cs)}")
        mod = pub.nsquare
        cs = [gmpy2.mpz(c) for c in cs]
        tables = []
        for members, inverted in zip(self.groups, self.inverted):
            inverses = _subset_products([gmpy2.invert(cs[j], mod) for j in inverted], mod) if inverted else None
            tables.append((_subset_products([cs[j] for j in members], mod), inverses))
        out = []
        for steps in self.schedule:
            acc = gmpy2.mpz(1)
            for step in steps:
                acc = acc * acc % mod
                for g, pos, neg in step:
                    if pos:
                        acc = acc * tables[g][0][pos] % mod
                    if neg:
                        acc = acc * tables[g][1][neg] % mod
            out.append(acc)
        if self.offset:
            shift = gmpy2.invert(out.pop(), mod)
            out = [y * shift % mod for y in out]
        return out


def multi_power(pub: "PublicKey", bases, exponents) -> "gmpy2.mpz":
    """``prod_j bases[j]**exponents[j] mod n**2`` for signed exponents, in one pass (Straus)."""
    return MatrixPowers([exponents]).apply(pub, list(bases))[0]


def _steps(pos: np.ndarray, neg: np.ndarray) -> list[tuple[tuple[int, int, int], ...]]:
    """A row's steps for :meth:`MatrixPowers.apply`: per bit, ``(group, positive subset, inverted
    subset)`` for each group with a base to multiply in."""
    groups = range(pos.shape[1])
    return [tuple([(g, a, b) for g, a, b in zip(groups, pa, na) if a or b])
            for pa, na in zip(pos.tolist(), neg.tolist())]


def _subset_products(bases, mod) -> list:
    """``table[s] = prod of bases[i] for the bits i of s``."""
    table = [gmpy2.mpz(1)]
    for b in bases:
        table += [x * b % mod for x in table]
    return table
