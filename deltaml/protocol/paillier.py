"""Paillier over integers: keys, homomorphic operations, verifiable decryption.

Key generation and the CRT decryption come from ``phe``; the homomorphic
operations are a few lines of ``gmpy2`` on raw integers, because the protocol
manages its own fixed-point scales (:mod:`deltaml.protocol.fixedpoint`) and
must never let ``phe`` pick exponents. Plaintexts are signed integers with
``|m| < n/3``; ciphertexts are integers modulo ``n**2`` and travel as hex.

Verifiable decryption: ``c = (1+n)**m * rho**n mod n**2`` determines ``m`` and
``rho mod n``; the key holder publishes both and anyone can check the equation.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import secrets
import threading
from dataclasses import dataclass, field
from typing import Protocol

import gmpy2
from phe import paillier as _phe

from .errors import KeyTooShort, NotACiphertext, ProofInvalid

DEFAULT_KEY_BITS = 2048
MIN_KEY_BITS = 2048

# An mpz is immutable: a deep copy of a state holding ciphertexts may share them, instead of a
# round trip through bytes per ciphertext (which the copy module does for types it does not know).
copy._deepcopy_dispatch[type(gmpy2.mpz(0))] = copy._deepcopy_atomic  # noqa: SLF001


class RandomSource(Protocol):
    """Where randomness comes from: ``secrets.SystemRandom`` in production,
    a seeded ``random.Random`` in a replay."""

    def randrange(self, start: int, stop: int) -> int: ...

    def getrandbits(self, k: int) -> int: ...


SYSTEM_RANDOM: RandomSource = secrets.SystemRandom()


class FixedBase:
    """``base**x mod modulus`` for many ``x`` through a table of ``base**(d * 256**i)``."""

    def __init__(self, base, modulus, exponent_bits: int) -> None:
        self.modulus = gmpy2.mpz(modulus)
        self.width = (exponent_bits + 7) // 8
        self.rows = []
        step = gmpy2.mpz(base) % self.modulus
        for _ in range(self.width):
            row = [gmpy2.mpz(1), step]
            for _ in range(254):
                row.append(row[-1] * step % self.modulus)
            self.rows.append(row)
            step = row[-1] * step % self.modulus  # base ** (256 ** (i + 1))

    def pow(self, x: int):
        """``base**x`` for ``0 <= x < 256**width``: one multiplication per non-zero byte of ``x``."""
        acc = gmpy2.mpz(1)
        mod = self.modulus
        for row, digit in zip(self.rows, int(x).to_bytes(self.width, "little")):
            if digit:
                acc = acc * row[digit] % mod
        return acc


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
        costs = [self._cost(inverted, schedule) + (INVERT_COST + len(rows) if offset else 0)
                 for inverted, schedule, offset in plans]
        self.cost = min(costs)
        self.inverted, self.schedule, self.offset = plans[costs.index(self.cost)]

    def __deepcopy__(self, memo) -> "MatrixPowers":
        return self  # nothing in it changes after construction

    def _plan(self, rows: list[list[int]]) -> tuple[list[list[int]], list]:
        """The bases to invert (only one with a negative entry in some row) and every row's steps."""
        negative = {j for row in rows for j, k in enumerate(row) if k < 0}
        inverted = [[j for j in members if j in negative] for members in self.groups]
        return inverted, [self._row_schedule(row, inverted) for row in rows]

    def _cost(self, inverted: list[list[int]], schedule: list) -> int:
        """Multiplications for the tables and the rows of one vector."""
        tables = sum(2 ** len(g) for g in self.groups) + sum(2 ** len(i) + INVERT_COST * len(i)
                                                             for i in inverted if i)
        steps = sum(len(row) + sum(bool(pos) + bool(neg) for step in row for _, pos, neg in step)
                    for row in schedule)
        return tables + steps

    def _row_schedule(self, row: list[int], inverted: list[list[int]]) -> list[tuple[tuple[int, int, int], ...]]:
        bits = max((abs(k).bit_length() for k in row), default=0)
        steps = []
        for t in range(bits - 1, -1, -1):
            step = []
            for g, members in enumerate(self.groups):
                pos = neg = 0
                for p, j in enumerate(members):
                    if (abs(row[j]) >> t) & 1:
                        if row[j] > 0:
                            pos |= 1 << p
                        else:
                            neg |= 1 << inverted[g].index(j)
                step.append((g, pos, neg))
            steps.append(tuple(s for s in step if s[1] or s[2]))
        return steps

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


def _subset_products(bases, mod) -> list:
    """``table[s] = prod of bases[i] for the bits i of s``."""
    table = [gmpy2.mpz(1)]
    for b in bases:
        table += [x * b % mod for x in table]
    return table


@functools.lru_cache(maxsize=8)
def _djn_h(n):
    """The DJN generator of a key: ``h = -y**2 mod n`` with ``y`` hashed from ``n`` (public)."""
    n = gmpy2.mpz(n)
    digest = hashlib.shake_256(b"deltaml-djn-base" + int(n).to_bytes((n.bit_length() + 7) // 8, "big"))
    y = gmpy2.mpz(int.from_bytes(digest.digest((n.bit_length() + 7) // 8 + 16), "big")) % n
    return (-(y * y)) % n


@functools.lru_cache(maxsize=8)
def _djn_hs(n):
    """The DJN fixed base ``h_s = h**n mod n**2`` of a key (public)."""
    n = gmpy2.mpz(n)
    return gmpy2.powmod(_djn_h(n), n, n * n)


_TABLES: dict = {}  # n -> FixedBase, the most recent keys' (a table is 16 MB for a 2048-bit key)
_TABLES_LOCK = threading.Lock()
_BUILDING: dict = {}  # n -> lock held while one thread builds that table
KEPT_TABLES = 4


def _fixed_base(n) -> FixedBase:
    """A table of powers of ``h**n mod n**2`` for the DJN obfuscators, built once per key:
    a thread that asks while another builds it waits for that build (a third of a second
    of work for a 2048-bit key) instead of doing it again."""
    n = gmpy2.mpz(n)
    with _TABLES_LOCK:
        table = _TABLES.get(n)
        if table is not None:
            return table
        building = _BUILDING.setdefault(n, threading.Lock())
    with building:
        with _TABLES_LOCK:
            table = _TABLES.get(n)
        if table is None:
            table = obfuscator_table(n)
            with _TABLES_LOCK:
                _TABLES[n] = table
                while len(_TABLES) > KEPT_TABLES:
                    _TABLES.pop(next(iter(_TABLES)))
                _BUILDING.pop(n, None)
    return table


def obfuscator_table(n) -> FixedBase:
    """A new table of powers of the DJN base ``h_s`` of the key with modulus ``n`` (the work a
    process does once per key before its encryptions take the fixed-base path)."""
    n = gmpy2.mpz(n)
    return FixedBase(_djn_hs(n), n * n, _djn_exponent_bits(n))


def _table_ready(n) -> bool:
    """Whether this process holds the obfuscator table of the key with modulus ``n``."""
    with _TABLES_LOCK:
        return gmpy2.mpz(n) in _TABLES


def warm_obfuscators(pub: "PublicKey") -> None:
    """Build ``pub``'s obfuscator table now (e.g. on a thread while a job is being set up)."""
    _fixed_base(pub.n)


def _djn_exponent_bits(n) -> int:
    """Length of the DJN random exponent: ``ceil(k / 2)`` for a ``k``-bit modulus."""
    return (int(gmpy2.mpz(n).bit_length()) + 1) // 2


class ObfuscatorStream:
    """The DJN obfuscators of one key as a numbered sequence: item ``k`` is ``h_s**x_k``
    with ``x_k`` derived from a secret seed and ``k``.

    Because an item depends only on its number, whoever computes it gets the same
    value: the protocol takes items in order (:meth:`take`), a helper thread may
    compute items ahead in idle time (:meth:`claim`, :meth:`compute`, :meth:`offer`),
    and a replay with the same seed produces the same ciphertexts either way. An item
    is used once; a precomputed item that arrives after its number was taken is dropped.
    """

    def __init__(self, pub: "PublicKey", seed: bytes, taken: int = 0, ahead: int = 128) -> None:
        self.pub, self.seed, self.ahead = pub, bytes(seed), ahead
        self.taken = taken  # number of the next item the protocol takes
        self.claimed = taken  # number of the next item a helper may compute
        self.ready: dict[int, object] = {}
        self.lock = threading.Lock()
        self.served_ahead = 0  # items the protocol found precomputed (for benchmarks)

    def exponent(self, k: int) -> int:
        bits = _djn_exponent_bits(self.pub.n)
        raw = hashlib.shake_256(self.seed + k.to_bytes(8, "big")).digest((bits + 7) // 8)
        return int.from_bytes(raw, "big") >> (-bits % 8)

    def compute(self, k: int):
        """Item ``k``, from scratch."""
        return _fixed_base(self.pub.n).pow(self.exponent(k))

    def take(self, power=None):
        """The next item: precomputed if a helper got there first, computed now otherwise
        (with ``power(x) = h_s**x mod n**2`` if given: the key holder's way without a table)."""
        with self.lock:
            k = self.taken
            self.taken += 1
            self.claimed = max(self.claimed, self.taken)
            value = self.ready.pop(k, None)
        if value is None:
            return self.compute(k) if power is None else power(self.exponent(k))
        self.served_ahead += 1
        return value

    def claim(self) -> int | None:
        """The number of an item worth computing ahead, or None if ``ahead`` items wait already."""
        with self.lock:
            if self.claimed - self.taken >= self.ahead:
                return None
            k = self.claimed
            self.claimed += 1
            return k

    def offer(self, k: int, value) -> None:
        """Hand in a precomputed item (kept only if its number is still to come)."""
        with self.lock:
            if k >= self.taken:
                self.ready[k] = value


def expect_obfuscators(pub: "PublicKey", rng: RandomSource, per_step: int, remaining: int | None = None) -> None:
    """Tell a random source with obfuscator streams that ``pub`` will need about
    ``per_step`` obfuscators per message, so a helper can start computing them;
    with ``remaining``, that no more than that many will be needed after all (a job's
    last rounds: a helper then stops instead of making items nobody takes)."""
    streams = getattr(rng, "obfuscators", None)
    if streams is not None:
        stream = streams(pub)
        stream.ahead = max(stream.ahead, 3 * per_step) if remaining is None else min(3 * per_step, remaining)


def check_key_bits(bits: int) -> None:
    """Refuse keys the protocol does not allow."""
    if bits < MIN_KEY_BITS:
        raise KeyTooShort(f"Paillier keys must have at least {MIN_KEY_BITS} bits, got {bits}")


@dataclass(frozen=True)
class PublicKey:
    """A Paillier public key with generator ``g = n + 1``."""

    n: int
    nsquare: int = field(init=False, repr=False)
    max_plain: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", gmpy2.mpz(self.n))
        object.__setattr__(self, "nsquare", self.n * self.n)
        object.__setattr__(self, "max_plain", self.n // 3)

    @property
    def bits(self) -> int:
        """Bit length of the modulus."""
        return int(self.n.bit_length())

    def to_hex(self) -> str:
        """The modulus as hex, the wire form of the key."""
        return format(self.n, "x")

    @classmethod
    @functools.lru_cache(maxsize=64)
    def from_hex(cls, text: str) -> "PublicKey":
        """Parse and check a key received from another party (cached: jobs ask on every message)."""
        key = cls(int(text, 16))
        check_key_bits(key.bits)
        return key

    def _plain(self, m: int) -> int:
        if abs(m) >= self.max_plain:
            raise OverflowError(f"plaintext of {int(m).bit_length()} bits does not fit the key")
        return m % self.n

    def require_ciphertexts(self, cs, what: str) -> None:
        """Refuse a received number that cannot be a ciphertext under this key: outside
        ``(0, n**2)`` or a multiple of ``n`` (one would poison every sum it enters, and a
        negative coefficient's inversion would fail on it). Any other non-unit shares exactly
        one prime with ``n``, so whoever could send one could factor ``n``: the remainder
        stands in for a gcd at a ninth of its cost."""
        n, n2 = self.n, self.nsquare
        for i, c in enumerate(cs):
            if not 0 < c < n2 or not c % n:
                raise NotACiphertext(f"{what}, entry {i}, is not a ciphertext under the job's key")

    def require_models(self, models, what: str) -> None:
        """:meth:`require_ciphertexts` for each vector of a ``{model id: vector}`` message field,
        named ``"<what> <model id>"``."""
        for mid, cs in models.items():
            self.require_ciphertexts(cs, f"{what} {mid}")

    def encode_plain(self, m: int):
        """``(1+n)**m mod n**2``: a deterministic ciphertext of ``m`` (randomness 1)."""
        return (1 + self._plain(m) * self.n) % self.nsquare

    def obfuscator(self, rng: RandomSource = SYSTEM_RANDOM):
        """A fresh random n-th residue ``h_s**x mod n**2``, the costly half of an encryption.

        Damgård–Jurik–Nielsen's fixed-base variant: ``h_s = (-y**2)**n`` for a ``y`` derived
        from the key (public, like ``g``) and ``x`` uniform of half the modulus' length,
        as DJN specify (PKC 2001 / IJIS 2010, section 4; HEU and ABY do the same). A
        windowed table of powers of ``h_s`` makes this about twenty times cheaper than
        ``r**n``. A random source that keeps numbered streams (:class:`ObfuscatorStream`)
        serves them from there, where idle time may have computed them already.
        """
        streams = getattr(rng, "obfuscators", None)
        if streams is not None:
            return streams(self).take()
        return _fixed_base(self.n).pow(rng.getrandbits(_djn_exponent_bits(self.n)))

    def randomness_pair(self, rng: RandomSource = SYSTEM_RANDOM):
        """``(rho, rho**n mod n**2)``: an obfuscator with its root, for a prover that must use ``rho``."""
        x = rng.getrandbits(_djn_exponent_bits(self.n))
        return gmpy2.powmod(_djn_h(self.n), x, self.n), _fixed_base(self.n).pow(x)

    def obfuscator_slow(self, rng: RandomSource = SYSTEM_RANDOM):
        """The textbook ``r**n mod n**2`` (kept for the benchmark of the lever)."""
        r = gmpy2.mpz(rng.randrange(1, int(self.n)))
        return gmpy2.powmod(r, self.n, self.nsquare)

    def encrypt(self, m: int, rng: RandomSource = SYSTEM_RANDOM):
        """A fresh encryption of the signed integer ``m``."""
        return self.encode_plain(m) * self.obfuscator(rng) % self.nsquare

    def rerandomize(self, c, rng: RandomSource = SYSTEM_RANDOM):
        """The same plaintext under fresh randomness."""
        return gmpy2.mpz(c) * self.obfuscator(rng) % self.nsquare

    def add(self, a, b):
        """``[x] + [y]``."""
        return gmpy2.mpz(a) * b % self.nsquare

    def add_plain(self, c, m: int):
        """``[x] + m`` for a plaintext ``m`` (keeps the randomness of ``c``)."""
        return gmpy2.mpz(c) * self.encode_plain(m) % self.nsquare

    def mul(self, c, k: int):
        """``k * [x]`` for a signed integer ``k``."""
        k = int(k)
        if k >= 0:
            return gmpy2.powmod(gmpy2.mpz(c), k, self.nsquare)
        return gmpy2.powmod(gmpy2.invert(gmpy2.mpz(c), self.nsquare), -k, self.nsquare)

    def neg(self, c):
        """``-[x]``."""
        return gmpy2.invert(gmpy2.mpz(c), self.nsquare)

    def dot(self, cs, ks) -> "gmpy2.mpz":
        """``sum_j k_j [x_j]`` as one multi-exponentiation (:func:`multi_power`): the squarings
        are shared by all terms, which pays when the coefficients are long (a validator's masks)."""
        return multi_power(self, list(cs), list(ks))

    def sum(self, cs):
        """``sum_j [x_j]``."""
        acc = gmpy2.mpz(1)
        for c in cs:
            acc = acc * c % self.nsquare
        return acc


@dataclass(frozen=True)
class Decryption:
    """A published decryption: plaintext and the Paillier randomness behind it."""

    plaintext: int
    randomness: int


class PrivateKey:
    """The buyer's Paillier private key; decrypts and encrypts through CRT."""

    def __init__(self, public: PublicKey, p: int, q: int) -> None:
        self.public = public
        self.p, self.q = gmpy2.mpz(min(p, q)), gmpy2.mpz(max(p, q))
        self._phe = _phe.PaillierPrivateKey(_phe.PaillierPublicKey(int(public.n)), int(self.p), int(self.q))
        n = public.n
        self._psq, self._qsq = self.p * self.p, self.q * self.q
        self._qsq_inv = gmpy2.invert(self._qsq, self._psq)
        self._n_mod_phi_psq = n % (self.p * (self.p - 1))
        self._n_mod_phi_qsq = n % (self.q * (self.q - 1))
        self._ninv_p = gmpy2.invert(n, self.p - 1)
        self._ninv_q = gmpy2.invert(n, self.q - 1)
        self._q_inv_p = gmpy2.invert(self.q, self.p)

    def __repr__(self) -> str:  # never print the factors
        return f"PrivateKey(bits={self.public.bits})"

    def decrypt_raw(self, c) -> "gmpy2.mpz":
        """The plaintext of ``c`` as an integer in ``[0, n)``."""
        return gmpy2.mpz(self._phe.raw_decrypt(int(c)))

    def decrypt(self, c) -> int:
        """The signed plaintext of ``c``; a value in the wrapped middle third is refused."""
        m = self.decrypt_raw(c)
        n = self.public.n
        if m <= self.public.max_plain:
            return int(m)
        if m >= n - self.public.max_plain:
            return int(m - n)
        raise OverflowError("decrypted value lies outside the signed range (overflow)")

    def _crt(self, xp, xq, p, q, q_inv_p):
        return xq + q * ((xp - xq) * q_inv_p % p)

    def obfuscator(self, rng: RandomSource = SYSTEM_RANDOM):
        """The public fixed-base obfuscator where this process has the key's table; otherwise the
        same value ``h_s**x`` through ``p**2`` and ``q**2`` (4.9 against 0.7 ms, but the table costs
        about 0.3 s: a buyer whose bulk work runs in its workers encrypts its first model without it)."""
        if _table_ready(self.public.n):
            return self.public.obfuscator(rng)
        streams = getattr(rng, "obfuscators", None)
        if streams is not None:
            return streams(self.public).take(self._djn_power)
        return self._djn_power(rng.getrandbits(_djn_exponent_bits(self.public.n)))

    def _djn_power(self, x: int):
        """``h_s**x mod n**2`` (the DJN obfuscator of exponent ``x``) through CRT."""
        pub = self.public
        h_s = _djn_hs(pub.n)
        xp = gmpy2.powmod(h_s % self._psq, x, self._psq)
        xq = gmpy2.powmod(h_s % self._qsq, x, self._qsq)
        return self._crt(xp, xq, self._psq, self._qsq, self._qsq_inv)

    def pow_crt(self, base, e: int):
        """``base**e mod n**2`` for ``base`` a unit, through ``p**2`` and ``q**2`` (the key holder's shortcut)."""
        e = gmpy2.mpz(e)
        xp = gmpy2.powmod(gmpy2.mpz(base) % self._psq, e % (self.p * (self.p - 1)), self._psq)
        xq = gmpy2.powmod(gmpy2.mpz(base) % self._qsq, e % (self.q * (self.q - 1)), self._qsq)
        return self._crt(xp, xq, self._psq, self._qsq, self._qsq_inv)

    def randomness_pair(self, rng: RandomSource = SYSTEM_RANDOM):
        """:meth:`PublicKey.randomness_pair` (the same draw gives the same pair) with the root
        ``h**x mod n`` computed modulo ``p`` and ``q``: about twice as fast for a prover."""
        pub = self.public
        x = rng.getrandbits(_djn_exponent_bits(pub.n))
        h = _djn_h(pub.n)
        rho_p = gmpy2.powmod(h % self.p, x % (self.p - 1), self.p)
        rho_q = gmpy2.powmod(h % self.q, x % (self.q - 1), self.q)
        return self._crt(rho_p, rho_q, self.p, self.q, self._q_inv_p), _fixed_base(pub.n).pow(x)

    def obfuscator_crt(self, rng: RandomSource = SYSTEM_RANDOM):
        """``r**n mod n**2`` computed modulo ``p**2`` and ``q**2`` (about 2x faster than textbook)."""
        r = gmpy2.mpz(rng.randrange(1, int(self.public.n)))
        xp = gmpy2.powmod(r, self._n_mod_phi_psq, self._psq)
        xq = gmpy2.powmod(r, self._n_mod_phi_qsq, self._qsq)
        return self._crt(xp, xq, self._psq, self._qsq, self._qsq_inv)

    def encode_and_obfuscate_crt(self, m: int, rng: RandomSource = SYSTEM_RANDOM):
        """An encryption with a CRT-computed textbook obfuscator (for the benchmark of the lever)."""
        return self.public.encode_plain(m) * self.obfuscator_crt(rng) % self.public.nsquare

    def encrypt(self, m: int, rng: RandomSource = SYSTEM_RANDOM):
        """A fresh encryption of ``m`` (same distribution as the public one)."""
        pub = self.public
        return pub.encode_plain(m) * self.obfuscator(rng) % pub.nsquare

    def decrypt_verifiably(self, c) -> Decryption:
        """Plaintext and randomness of ``c``, checkable by :func:`verify_decryption`."""
        m = self.decrypt(c)
        return Decryption(plaintext=m, randomness=self.randomness(c, m))

    def randomness(self, c, m: int) -> int:
        """The ``rho`` with ``c = (1+n)**m * rho**n mod n**2``, for ``m`` the plaintext of ``c``."""
        pub = self.public
        plain = (1 + (int(m) % pub.n) * pub.n) % pub.nsquare
        residue = gmpy2.mpz(c) * gmpy2.invert(plain, pub.nsquare) % pub.nsquare
        rho_p = gmpy2.powmod(residue % self.p, self._ninv_p, self.p)
        rho_q = gmpy2.powmod(residue % self.q, self._ninv_q, self.q)
        return int(self._crt(rho_p, rho_q, self.p, self.q, self._q_inv_p))


def verify_decryption(public: PublicKey, c, decryption: Decryption) -> bool:
    """Whether ``c == (1+n)**m * rho**n mod n**2``: anyone can call this."""
    rho = gmpy2.mpz(decryption.randomness)
    if not 0 < rho < public.n:
        return False
    try:
        expected = public.encode_plain(decryption.plaintext)
    except OverflowError:
        return False
    expected = expected * gmpy2.powmod(rho, public.n, public.nsquare) % public.nsquare
    return expected == gmpy2.mpz(c) % public.nsquare


def require_valid_decryption(public: PublicKey, c, decryption: Decryption) -> None:
    """Raise :class:`ProofInvalid` unless the decryption checks."""
    if not verify_decryption(public, c, decryption):
        raise ProofInvalid("published decryption does not match its ciphertext")


def generate_keypair(bits: int = DEFAULT_KEY_BITS) -> tuple[PublicKey, PrivateKey]:
    """A fresh key pair; fewer than 2048 bits is refused."""
    check_key_bits(bits)
    pub, priv = _phe.generate_paillier_keypair(n_length=bits)
    public = PublicKey(pub.n)
    return public, PrivateKey(public, priv.p, priv.q)
