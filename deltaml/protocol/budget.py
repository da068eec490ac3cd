"""How far the fixed-point scale may grow before a refresh.

A plaintext must stay below ``n/3`` (signed range) even with a mask added, so
every check is ``bits + mask overhead <= key_bits - 3``. Training grows the
scale by ``2 f`` per round; evaluation squares the model, so it needs about
twice the room. The aggregator refreshes only when the next step would not
fit: with a 2048-bit key that is every 20 rounds or so, not every round.
"""

from __future__ import annotations

from .fixedpoint import SLACK_BITS
from .machine import is_eval_round

MASK_OVERHEAD = 2 + SLACK_BITS
#: Room left for ``log2`` of a validator's Gram matrix row sums (2**64 rows).
GRAM_MARGIN_BITS = 64


def capacity_bits(key_bits: int) -> int:
    """Largest bit length a masked plaintext may have."""
    return key_bits - 3


def fits_mask(value_bits: int, key_bits: int) -> bool:
    """Whether a value of ``value_bits`` can be masked without wrapping."""
    return value_bits + MASK_OVERHEAD <= capacity_bits(key_bits)


def can_train(scale_bits: int, frac_bits: int, magnitude_bits: int, key_bits: int) -> bool:
    """Whether one more gradient step fits at ``scale_bits``."""
    return fits_mask(magnitude_bits + scale_bits + 2 * frac_bits, key_bits)


def can_evaluate(scale_bits: int, frac_bits: int, magnitude_bits: int, key_bits: int) -> bool:
    """Whether the metric's masked product fits at ``scale_bits``."""
    product = 2 * (magnitude_bits + scale_bits + MASK_OVERHEAD) + frac_bits + GRAM_MARGIN_BITS
    return product <= capacity_bits(key_bits)


def plan(scale_bits: int, from_round: int, rounds: int, eval_every: int, frac_bits: int, magnitude_bits: int,
         key_bits: int) -> tuple[list[int], list[int]]:
    """The rest of a job as the budget rule will run it from ``scale_bits`` at ``from_round``:
    the scales at which it refreshes and those at which it evaluates (the aggregator's rule:
    before an evaluation that does not fit, and before a step that does not fit)."""
    f, b = frac_bits, magnitude_bits
    scale, refreshes, evals = scale_bits, [], []
    for r in range(from_round, rounds + 1):
        if is_eval_round(r, rounds, eval_every):
            if not can_evaluate(scale, f, b, key_bits):
                refreshes.append(scale)
                scale = f
            evals.append(scale)
        if r == rounds:
            break
        if not can_train(scale, f, b, key_bits):
            refreshes.append(scale)
            scale = f
        scale += 2 * f
    return refreshes, evals
