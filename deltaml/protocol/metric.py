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
values, and the product ``C_j`` has the same shape for the proof of issue 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import DecryptionRefused
from .linear import EncodedStats
from .paillier import SYSTEM_RANDOM, PrivateKey, PublicKey, RandomSource
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
    secrets_ = MetricSecrets(scale_bits, tuple(w), tuple(h), tuple(u), alpha, beta)
    return u, v, w_bits, h_bits, secrets_


def masked_products(
    priv: PrivateKey, u: Sequence[int], v: Sequence[int], u_bits: int, rng: RandomSource = SYSTEM_RANDOM
) -> list:
    """Step 2, the buyer: ``C_j = [v_j]**u_j`` re-randomised, after a range check on ``u``."""
    if len(u) != len(v):
        raise DecryptionRefused("masked product request with unequal vectors")
    pub = priv.public
    bound = mask_bound(u_bits)
    out = []
    for uc, vc in zip(u, v):
        uj = priv.decrypt_raw(uc)
        if uj >= bound:
            raise DecryptionRefused("masked value out of range: not a masked model coordinate")
        out.append(pub.mul(vc, int(uj)) * priv.obfuscator(rng) % pub.nsquare)
    return out


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


def sse_scale_bits(scale_bits: int, frac_bits: int) -> int:
    """Scale of ``[SSE]`` for a model at ``scale_bits``."""
    return 2 * scale_bits + frac_bits
