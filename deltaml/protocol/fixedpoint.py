"""Fixed-point encoding of reals as integers for Paillier plaintexts.

A real ``x`` at scale ``s`` is the integer ``round(x * 2**s)``. Every value the
protocol encrypts has a declared magnitude bound (``|x| < 2**magnitude_bits``
in real units); encoding outside it raises :class:`FixedPointOverflow` rather
than letting the integer wrap modulo ``n`` later. Encoding is exact rational
arithmetic, so scales of thousands of bits are fine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from .errors import FixedPointOverflow

#: Statistical slack of every additive mask: a masked value is within
#: 2**-SLACK_BITS of uniform whatever the secret it hides.
SLACK_BITS = 80

#: While ``magnitude_bits + scale`` stays below this, a value within the bound times ``2**scale`` is a
#: float, computed exactly (a power of two only moves the exponent), and ``round`` of it is the exact
#: value rounded half to even, as with fractions, at a fraction of the cost (a trainer encodes its
#: Gram matrix, 441 entries at d = 21, when it takes its role).
_FLOAT_EXPONENT = 1023


@dataclass(frozen=True)
class FixedPoint:
    """Codec for fixed-point integers: ``frac_bits`` per scalar factor."""

    frac_bits: int = 32
    magnitude_bits: int = 60

    def encode(self, x: float, scale_bits: int | None = None) -> int:
        """Encode ``x`` at ``scale_bits`` (default ``frac_bits``); refuse NaN and overflow."""
        scale = self.frac_bits if scale_bits is None else scale_bits
        if not math.isfinite(x):
            raise FixedPointOverflow(f"cannot encode non-finite value {x!r}")
        if abs(x) >= 2.0**self.magnitude_bits:
            raise FixedPointOverflow(
                f"value {x!r} exceeds the magnitude bound 2**{self.magnitude_bits}"
            )
        if isinstance(x, float) and 0 <= scale <= _FLOAT_EXPONENT - self.magnitude_bits:  # exactly a float
            return round(math.ldexp(x, scale))
        return round(Fraction(x) * (1 << scale))

    def encode_vector(self, xs, scale_bits: int | None = None) -> list[int]:
        """Encode each element of ``xs``."""
        return [self.encode(float(x), scale_bits) for x in xs]

    def decode(self, v: int, scale_bits: int | None = None) -> float:
        """The real number an integer at ``scale_bits`` stands for (correctly rounded)."""
        scale = self.frac_bits if scale_bits is None else scale_bits
        return int(v) / (1 << scale)

    def value_bits(self, scale_bits: int) -> int:
        """Bit bound of any encoded value at ``scale_bits``: ``|v| < 2**value_bits``."""
        return self.magnitude_bits + scale_bits
