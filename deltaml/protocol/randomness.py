"""Where a Paillier encryption's randomness comes from.

An encryption's costly half is its obfuscator, a random ``n``-th residue. We use
Damgård–Jurik–Nielsen's fixed-base form ``h_s**x`` (``h_s`` derived from the key,
public like ``g``; ``x`` of half the modulus' length), served by a table of powers
of ``h_s`` that each process builds once per key (:func:`fixed_base`). A random
source may keep numbered streams of obfuscators (:class:`ObfuscatorStream`), so
that idle time computes them ahead and a replay with the same seed produces the
same ciphertexts either way.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import threading
from typing import TYPE_CHECKING, Protocol

import gmpy2

from .powers import DEFAULT_WINDOW, FixedBase, window_for

if TYPE_CHECKING:
    from .paillier import PublicKey


class RandomSource(Protocol):
    """Where randomness comes from: ``secrets.SystemRandom`` in production,
    a seeded ``random.Random`` in a replay."""

    def randrange(self, start: int, stop: int) -> int: ...

    def getrandbits(self, k: int) -> int: ...


SYSTEM_RANDOM: RandomSource = secrets.SystemRandom()


@functools.lru_cache(maxsize=8)
def djn_h(n):
    """The DJN generator of a key: ``h = -y**2 mod n`` with ``y`` hashed from ``n`` (public)."""
    n = gmpy2.mpz(n)
    digest = hashlib.shake_256(b"deltaml-djn-base" + int(n).to_bytes((n.bit_length() + 7) // 8, "big"))
    y = gmpy2.mpz(int.from_bytes(digest.digest((n.bit_length() + 7) // 8 + 16), "big")) % n
    return (-(y * y)) % n


@functools.lru_cache(maxsize=8)
def djn_hs(n):
    """The DJN fixed base ``h_s = h**n mod n**2`` of a key (public)."""
    n = gmpy2.mpz(n)
    return gmpy2.powmod(djn_h(n), n, n * n)


_TABLES: dict = {}  # n -> FixedBase, the most recent keys' (for a 2048-bit key 16 MB at 8 bits, 54 at 10)
_TABLES_LOCK = threading.Lock()
_BUILDING: dict = {}  # n -> lock held while one thread builds that table
_EXPECTED: dict = {}  # n -> obfuscators this process's agents said they will draw, until the table is built
KEPT_TABLES = 4
KEPT_EXPECTATIONS = 64  # keys announced whose table was never built (a job that ended before its first round)


def fixed_base(n) -> FixedBase:
    """A table of powers of ``h**n mod n**2`` for the DJN obfuscators, built once per key:
    a thread that asks while another builds it waits for that build (a sixth to half a
    second of work for a 2048-bit key) instead of doing it again. Its window suits the
    obfuscators this process's agents said they would draw under the key (:func:`expect_uses`;
    8 bits if none did)."""
    n = gmpy2.mpz(n)
    with _TABLES_LOCK:
        table = _TABLES.get(n)
        if table is not None:
            return table
        building = _BUILDING.setdefault(n, threading.Lock())
    with building:
        with _TABLES_LOCK:
            table = _TABLES.get(n)
            uses = _EXPECTED.pop(n, None) if table is None else None
        if table is None:
            table = obfuscator_table(n, uses)
            with _TABLES_LOCK:
                _TABLES[n] = table
                while len(_TABLES) > KEPT_TABLES:
                    _TABLES.pop(next(iter(_TABLES)))
                _BUILDING.pop(n, None)
    return table


def obfuscator_table(n, uses: int | None = None) -> FixedBase:
    """A new table of powers of the DJN base ``h_s`` of the key with modulus ``n`` (the work a
    process does once per key before its encryptions take the fixed-base path), its window
    chosen for ``uses`` obfuscators if given."""
    n = gmpy2.mpz(n)
    bits = djn_exponent_bits(n)
    return FixedBase(djn_hs(n), n * n, bits, DEFAULT_WINDOW if uses is None else window_for(uses, bits))


def expect_uses(n, uses: int) -> None:
    """Count ``uses`` more obfuscators that an agent of this process will draw under the key
    with modulus ``n`` (a trainer: its job's rounds x models x coefficients). Agents that share
    a process share its table, so the window is chosen for their sum; a table built already
    stays as it is."""
    n = gmpy2.mpz(n)
    with _TABLES_LOCK:
        if n in _TABLES:
            return
        _EXPECTED[n] = _EXPECTED.pop(n, 0) + max(0, int(uses))  # (re)inserted last: the oldest go first
        while len(_EXPECTED) > KEPT_EXPECTATIONS:
            _EXPECTED.pop(next(iter(_EXPECTED)))


def forget_table(n) -> None:
    """Drop this process's table for the key with modulus ``n`` (the next use builds it again)."""
    with _TABLES_LOCK:
        _TABLES.pop(gmpy2.mpz(n), None)


def table_ready(n) -> bool:
    """Whether this process holds the obfuscator table of the key with modulus ``n``."""
    with _TABLES_LOCK:
        return gmpy2.mpz(n) in _TABLES


def warm_obfuscators(pub: "PublicKey") -> None:
    """Build ``pub``'s obfuscator table now (e.g. on a thread while a job is being set up)."""
    fixed_base(pub.n)


def djn_exponent_bits(n) -> int:
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
        bits = djn_exponent_bits(self.pub.n)
        raw = hashlib.shake_256(self.seed + k.to_bytes(8, "big")).digest((bits + 7) // 8)
        return int.from_bytes(raw, "big") >> (-bits % 8)

    def compute(self, k: int):
        """Item ``k``, from scratch."""
        return fixed_base(self.pub.n).pow(self.exponent(k))

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


def expect_obfuscators(pub: "PublicKey", rng: RandomSource, per_step: int, remaining: int | None = None,
                       uses: int | None = None) -> None:
    """Tell a random source with obfuscator streams that ``pub`` will need about
    ``per_step`` obfuscators per message, so a helper can start computing them;
    with ``remaining``, that no more than that many will be needed after all (a job's
    last rounds: a helper then stops instead of making items nobody takes); with ``uses``,
    about how many the job will take in all (:func:`expect_uses`, for any random source)."""
    if uses is not None:
        expect_uses(pub.n, uses)
    streams = getattr(rng, "obfuscators", None)
    if streams is not None:
        stream = streams(pub)
        stream.ahead = max(stream.ahead, 3 * per_step) if remaining is None else min(3 * per_step, remaining)
