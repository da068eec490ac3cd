"""The masked validation metric: ``[SSE_v(w)]`` without anyone seeing ``w``.

A validator holds ``G_v, b_v, c_v`` and ``SSE_v(w) = w^T G_v w - 2 b_v^T w + c_v``.
The quadratic term needs one ciphertext-by-ciphertext product per coordinate,
obtained from the buyer, who holds the key:

1. validator: ``[h] = G_v [w]``; draws masks ``alpha``, ``beta`` and sends
   ``[u] = [w + alpha]`` and ``[v] = [h + beta]`` (fresh randomness);
2. buyer: decrypts only ``u`` (uniformly masked), checks its range and returns
   ``C_j = [v_j]**u_j``, re-randomised: an encryption of ``(h_j+beta_j) u_j``;
3. validator: ``[h_j w_j] = C_j - beta_j [u_j] - alpha_j [h_j]``, then
   ``[SSE_v] = sum_j [h_j w_j] - 2 b_v^T [w] + c_v``, freshly randomised.

DESIGN §2 sends ``[h]`` itself; the buyer holds the key and could decrypt
``h = G_v w``, so ``h`` is masked too (``beta``): the buyer sees only masked
values. The buyer proves each ``C_j`` (:class:`MulProof`, Fiat–Shamir) and the
validator checks the proofs (:func:`verify_products`) before using them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import gmpy2

from .errors import DecryptionRefused, OutsideMask
from .linear import EncodedStats
from .paillier import PrivateKey, PublicKey
from .powers import multi_power
from .randomness import SYSTEM_RANDOM, RandomSource
from .refresh import draw_mask, mask_bound


@dataclass(frozen=True)
class MetricSecrets:
    """What the validator keeps between steps 1 and 3 (never sent)."""

    scale_bits: int
    w: tuple
    h: tuple
    u: tuple
    alpha: tuple[int, ...]
    beta: tuple[int, ...]
    v: tuple = ()


def gram_bits(enc: EncodedStats) -> int:
    """Bits that ``G_v`` can add to a value: ``log2`` of its largest absolute row sum."""
    return max(sum(abs(g) for g in row) for row in enc.gram_q).bit_length() - enc.codec.frac_bits + 1


def mask_product_inputs(
    pub: PublicKey, enc: EncodedStats, w: Sequence[int], scale_bits: int, rng: RandomSource = SYSTEM_RANDOM
) -> tuple[list, list, int, int, MetricSecrets]:
    """Step 1: ``([u], [v], u_bits, v_bits, secrets)``; the bits bound ``|w|`` and ``|h|``."""
    codec = enc.codec
    w_bits = codec.value_bits(scale_bits)
    h_bits = codec.value_bits(scale_bits + codec.frac_bits) + gram_bits(enc)
    h = enc.gram_times(pub, w)
    alpha = tuple(draw_mask(w_bits, rng) for _ in w)
    beta = tuple(draw_mask(h_bits, rng) for _ in w)
    u = [pub.add(wj, pub.encrypt(a, rng)) for wj, a in zip(w, alpha)]
    v = [pub.add(hj, pub.encrypt(b, rng)) for hj, b in zip(h, beta)]
    secrets_ = MetricSecrets(scale_bits, tuple(w), tuple(h), tuple(u), alpha, beta, tuple(v))
    return u, v, w_bits, h_bits, secrets_


CHALLENGE_BITS = 128
BATCH_BITS = 64


@dataclass(frozen=True)
class MulProof:
    """Proof that ``C = [v]**u * rho**n`` for the plaintext ``u`` of ``[u]`` (one coordinate).

    Commitments ``A = (1+n)**a * s**n`` and ``B = [v]**a * t**n``; with the
    Fiat–Shamir challenge ``e`` the answers are ``z = a + e u mod n``,
    ``w1 = s * r_u**e`` and ``w2 = t * rho**e * [v]**floor((a + e u) / n)`` (mod n),
    and the verifier checks ``(1+n)**z w1**n = A [u]**e`` and
    ``[v]**z w2**n = B C**e`` modulo ``n**2`` (Cramer–Damgård–Nielsen's
    multiplication protocol).
    """

    a: int
    b: int
    z: int
    w1: int
    w2: int


def _challenge(pub: PublicKey, context: bytes, rows) -> int:
    digest = hashlib.sha256(b"deltaml-mulproof-v1" + len(context).to_bytes(4, "big") + context)
    for row in [(pub.n,), *rows]:
        for x in row:
            raw = int(x).to_bytes((int(x).bit_length() + 7) // 8 or 1, "big")
            digest.update(len(raw).to_bytes(4, "big") + raw)
    return int.from_bytes(digest.digest()[: CHALLENGE_BITS // 8], "big")


def masked_products(
    priv: PrivateKey, u: Sequence[int], v: Sequence[int], u_bits: int, rng: RandomSource = SYSTEM_RANDOM,
    context: bytes = b"",
) -> tuple[list, list[MulProof]]:
    """Step 2, the buyer: ``C_j = [v_j]**u_j`` re-randomised, after a range check on ``u``, with a
    proof per coordinate bound to ``context`` (job, round, model) that nothing else was returned."""
    if len(u) != len(v):
        raise DecryptionRefused("masked product request with unequal vectors")
    pub = priv.public
    n, n2 = pub.n, pub.nsquare
    bound = mask_bound(u_bits)
    out, secrets_ = [], []
    for uc, vc in zip(u, v):
        uj = priv.decrypt_raw(uc)
        if uj >= bound:
            raise OutsideMask("masked value out of range: not a masked model coordinate")
        vc = gmpy2.mpz(vc)
        rho, rho_n = priv.randomness_pair(rng)
        c = priv.pow_crt(vc, uj) * rho_n % n2
        a = gmpy2.mpz(rng.randrange(0, int(n)))
        s_, s_n = priv.randomness_pair(rng)
        t_, t_n = priv.randomness_pair(rng)
        commit_a = (1 + a * n) % n2 * s_n % n2
        commit_b = priv.pow_crt(vc, a) * t_n % n2
        out.append(c)
        secrets_.append((uj, priv.randomness(uc, uj), rho, a, s_, t_, commit_a, commit_b))
    e = _challenge(pub, context, [(uc, vc, c, sec[6], sec[7]) for uc, vc, c, sec in zip(u, v, out, secrets_)])
    proofs = []
    for vc, (uj, r_u, rho, a, s_, t_, commit_a, commit_b) in zip(v, secrets_):
        carry, z = divmod(a + e * uj, n)
        w1 = s_ * gmpy2.powmod(r_u, e, n) % n
        w2 = t_ * gmpy2.powmod(rho, e, n) % n * gmpy2.powmod(gmpy2.mpz(vc) % n, carry, n) % n
        proofs.append(MulProof(a=int(commit_a), b=int(commit_b), z=int(z), w1=int(w1), w2=int(w2)))
    return out, proofs


@dataclass(frozen=True)
class ProductClaim:
    """One model's masked products as the buyer returned them, with what they must answer:
    the validator's ``[u]``, ``[v]`` and the context the proofs are bound to."""

    u: Sequence[int]
    v: Sequence[int]
    products: Sequence[int]
    proofs: Sequence[MulProof]
    context: bytes = b""


def verify_products(pub: PublicKey, u: Sequence[int], v: Sequence[int], products: Sequence[int],
                    proofs: Sequence[MulProof], context: bytes = b"", rng: RandomSource = SYSTEM_RANDOM) -> bool:
    """Whether every ``C_j`` is ``[v_j]**Dec([u_j])`` re-randomised (the validator's check)."""
    return verify_all_products(pub, [ProductClaim(u, v, products, proofs, context)], rng)


def verify_all_products(pub: PublicKey, claims: Sequence[ProductClaim], rng: RandomSource = SYSTEM_RANDOM) -> bool:
    """Whether every claim's products check (:func:`verify_products` for several models at once).

    Every coordinate of every claim is checked together, each equation raised
    to a fresh random ``BATCH_BITS``-bit weight, so the two ``n``-th powers
    are taken once for all of them and the multi-exponentiations share their
    squarings: a forged coordinate anywhere passes with probability about
    ``2**-BATCH_BITS``. Each claim keeps its own Fiat–Shamir challenge, bound
    to its own context. (Elements of small order, which the weights could
    miss, all encrypt zero: they cannot change a product.)
    """
    if not claims:
        return False
    n, n2 = pub.n, pub.nsquare
    ks, kes, kzs, us, vs, cs, proofs = [], [], [], [], [], [], []
    for claim in claims:
        u, v, products, prs = claim.u, claim.v, claim.products, claim.proofs
        if not len(u) == len(v) == len(products) == len(prs) or not u:
            return False
        for pr, c in zip(prs, products):
            if not (0 <= pr.z < n and 0 < pr.w1 < n and 0 < pr.w2 < n and 0 < c < n2 and 0 < pr.a < n2
                    and 0 < pr.b < n2):
                return False
        e = _challenge(pub, claim.context, [(uc, vc, c, pr.a, pr.b) for uc, vc, c, pr in zip(u, v, products, prs)])
        for pr in prs:
            k = rng.getrandbits(BATCH_BITS) | 1
            ks.append(k)
            kes.append(k * e)
            kzs.append(k * pr.z)
        us += u
        vs += v
        cs += products
        proofs += prs
    try:  # each side one multi-exponentiation; a base that is no unit mod n**2 is no valid proof
        w1 = multi_power(pub, [pr.w1 for pr in proofs], ks)
        w2 = multi_power(pub, [pr.w2 for pr in proofs], ks)
        lhs2 = multi_power(pub, [*vs, w2], [*kzs, n])
        rhs1 = multi_power(pub, [*(pr.a for pr in proofs), *us], [*ks, *kes])
        rhs2 = multi_power(pub, [*(pr.b for pr in proofs), *cs], [*ks, *kes])
    except ZeroDivisionError:
        return False
    lhs1 = (1 + (sum(kzs) % n) * n) % n2 * gmpy2.powmod(w1, n, n2) % n2
    return lhs1 == rhs1 and lhs2 == rhs2


def encrypted_sse(
    pub: PublicKey, enc: EncodedStats, products: Sequence[int], secrets_: MetricSecrets,
    rng: RandomSource = SYSTEM_RANDOM,
) -> object:
    """Step 3: ``[SSE_v]`` at scale ``2 s + f``, freshly randomised."""
    codec = enc.codec
    s = secrets_.scale_bits
    b_q = codec.encode_vector(enc.stats.moment, s + codec.frac_bits)
    c_q = codec.encode(enc.stats.sq, 2 * s + codec.frac_bits) if enc.stats.sq < 2.0**codec.magnitude_bits else None
    if c_q is None:
        raise OverflowError("validation targets too large for the magnitude bound")
    ciphers = [*products, *secrets_.u, *secrets_.h, *secrets_.w]
    coeffs = [*([1] * len(products)), *(-b for b in secrets_.beta), *(-a for a in secrets_.alpha),
              *(-2 * b for b in b_q)]
    return pub.add(pub.dot(ciphers, coeffs), pub.encrypt(c_q, rng))


def proof_context(job_id: str, round_: int, model: str, validator: str) -> bytes:
    """What a product proof is bound to: it cannot be replayed for another request."""
    return f"{job_id}|{round_}|{model}|{validator}".encode()


def sse_scale_bits(scale_bits: int, frac_bits: int) -> int:
    """Scale of ``[SSE]`` for a model at ``scale_bits``."""
    return 2 * scale_bits + frac_bits
