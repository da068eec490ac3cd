"""The masked refresh: bring an encrypted model back to a small scale.

Each gradient step multiplies the fixed-point scale by ``2**(2f)``. Before the
scale outgrows the key, the aggregator asks the buyer to divide by
``2**drop_bits`` — without the buyer learning the model:

1. aggregator: ``[z] = [x] + [R]``, ``R = 2**k + r``, ``r`` uniform on
   ``k + 1 + SLACK_BITS`` bits, where ``|x| < 2**k``; ``R`` is encrypted
   freshly so ``z``'s randomness tells the buyer nothing either;
2. buyer: decrypts ``z`` (uniform up to ``2**-SLACK_BITS``), checks it is in
   range, returns a fresh ``[floor(z / D)]``;
3. aggregator: subtracts ``floor(R / D)``.

The result is ``floor(x / D)`` or one more, with probability equal to the
fraction: stochastic rounding, unbiased, within one unit of the last place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import OutsideMask
from .fixedpoint import SLACK_BITS
from .paillier import PrivateKey, PublicKey
from .randomness import SYSTEM_RANDOM, RandomSource


def mask_bound(value_bits: int) -> int:
    """Exclusive upper bound of any honestly masked value with ``|x| < 2**value_bits``."""
    return 1 << (value_bits + 2 + SLACK_BITS)


def draw_mask(value_bits: int, rng: RandomSource) -> int:
    """A positive mask hiding any ``|x| < 2**value_bits`` with ``SLACK_BITS`` of slack."""
    return (1 << value_bits) + rng.getrandbits(value_bits + 1 + SLACK_BITS)


@dataclass(frozen=True)
class RefreshMasks:
    """What the aggregator keeps to unmask a refresh: the masks and the drop."""

    masks: tuple[int, ...]
    drop_bits: int


def mask_for_refresh(
    pub: PublicKey, ciphers: Sequence[int], value_bits: int, drop_bits: int, rng: RandomSource = SYSTEM_RANDOM
) -> tuple[list, RefreshMasks]:
    """Aggregator side of step 1."""
    masks = tuple(draw_mask(value_bits, rng) for _ in ciphers)
    masked = [pub.add(c, pub.encrypt(m, rng)) for c, m in zip(ciphers, masks)]
    return masked, RefreshMasks(masks=masks, drop_bits=drop_bits)


def refresh_masked(
    priv: PrivateKey, masked: Sequence[int], value_bits: int, drop_bits: int, rng: RandomSource = SYSTEM_RANDOM
) -> list:
    """Buyer side: decrypt masked values, check their range, rescale, re-encrypt."""
    bound = mask_bound(value_bits)
    out = []
    for c in masked:
        z = priv.decrypt_raw(c)
        if z >= bound:
            # nothing about z in the reason: it is the decryption of whatever was sent
            raise OutsideMask("refresh value out of range: the model exceeded its magnitude bound "
                              "or the ciphertext is not a masked value")
        out.append(priv.encrypt(int(z >> drop_bits), rng))
    return out


def unmask_refreshed(pub: PublicKey, refreshed: Sequence[int], masks: RefreshMasks) -> list:
    """Aggregator side of step 3."""
    if len(refreshed) != len(masks.masks):
        raise ValueError("refresh reply has the wrong length")
    return [pub.add_plain(c, -(m >> masks.drop_bits)) for c, m in zip(refreshed, masks.masks)]
