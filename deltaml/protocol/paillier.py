"""Paillier over integers: keys, homomorphic operations, verifiable decryption.

Key generation and the CRT decryption come from ``phe``; the homomorphic
operations are a few lines of ``gmpy2`` on raw integers, because the protocol
manages its own fixed-point scales (:mod:`deltaml.protocol.fixedpoint`) and
must never let ``phe`` pick exponents. Plaintexts are signed integers with
``|m| < n/3``; ciphertexts are integers modulo ``n**2`` and travel as hex.

Verifiable decryption: ``c = (1+n)**m * rho**n mod n**2`` determines ``m`` and
``rho mod n``; the key holder publishes both and anyone can check the equation.

Where the randomness comes from (the DJN obfuscators, their tables and numbered
streams) is :mod:`deltaml.protocol.randomness`; the fast exponentiation behind
products and sums is :mod:`deltaml.protocol.powers`.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import gmpy2
from phe import paillier as _phe

from .errors import KeyTooShort, NotACiphertext, ProofInvalid
from .powers import multi_power
from .randomness import SYSTEM_RANDOM, RandomSource, djn_exponent_bits, djn_h, djn_hs, fixed_base, table_ready

DEFAULT_KEY_BITS = 2048
MIN_KEY_BITS = 2048

# An mpz is immutable: a deep copy of a state holding ciphertexts may share them, instead of a
# round trip through bytes per ciphertext (which the copy module does for types it does not know).
copy._deepcopy_dispatch[type(gmpy2.mpz(0))] = copy._deepcopy_atomic  # noqa: SLF001


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
        ``r**n``. A random source that keeps numbered streams (:class:`~deltaml.protocol.randomness.ObfuscatorStream`)
        serves them from there, where idle time may have computed them already.
        """
        streams = getattr(rng, "obfuscators", None)
        if streams is not None:
            return streams(self).take()
        return fixed_base(self.n).pow(rng.getrandbits(djn_exponent_bits(self.n)))

    def randomness_pair(self, rng: RandomSource = SYSTEM_RANDOM):
        """``(rho, rho**n mod n**2)``: an obfuscator with its root, for a prover that must use ``rho``."""
        x = rng.getrandbits(djn_exponent_bits(self.n))
        return gmpy2.powmod(djn_h(self.n), x, self.n), fixed_base(self.n).pow(x)

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
        if table_ready(self.public.n):
            return self.public.obfuscator(rng)
        streams = getattr(rng, "obfuscators", None)
        if streams is not None:
            return streams(self.public).take(self._djn_power)
        return self._djn_power(rng.getrandbits(djn_exponent_bits(self.public.n)))

    def _djn_power(self, x: int):
        """``h_s**x mod n**2`` (the DJN obfuscator of exponent ``x``) through CRT."""
        pub = self.public
        h_s = djn_hs(pub.n)
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
        x = rng.getrandbits(djn_exponent_bits(pub.n))
        h = djn_h(pub.n)
        rho_p = gmpy2.powmod(h % self.p, x % (self.p - 1), self.p)
        rho_q = gmpy2.powmod(h % self.q, x % (self.q - 1), self.q)
        return self._crt(rho_p, rho_q, self.p, self.q, self._q_inv_p), fixed_base(pub.n).pow(x)

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
