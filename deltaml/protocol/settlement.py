"""Contributions and the integer payment split (DESIGN §2).

Metrics cross into money as integers: MSEs in micro-units. The split is
exact: fixed rewards to every participant that completed its work (not to a
trainer dropped for not answering), the variable pool times the
improvement ``(mse0 - mse_final) / mse0`` (clamped to [0, 1]) split pro rata
to positive contributions, integer division remainders and the unused pool
refunded to the buyer. Payments plus refund equal the deposit to the wei.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

#: Seconds a job may run before anyone can settle or refund it without the buyer.
DEFAULT_DEADLINE = 24 * 3600


def leave_one_out(mse_full: float, mse_without: Mapping[str, float]) -> dict[str, float]:
    """Contribution of each trainer: MSE without it minus MSE with everyone."""
    return {owner: mse - mse_full for owner, mse in mse_without.items()}


@dataclass(frozen=True)
class Settlement:
    """Who is paid what, and what goes back to the buyer (all wei)."""

    deposit: int
    payments: dict[str, int]
    refund: int
    variable_paid: int


def deposit_for(fixed_reward: int, participants: int, variable_pool: int) -> int:
    """The escrow a job needs."""
    return fixed_reward * participants + variable_pool


def settle(
    *,
    fixed_reward: int,
    variable_pool: int,
    participants: Sequence[str],
    contributions_micro: Mapping[str, int],
    mse0_micro: int,
    mse_final_micro: int,
    dropped: Sequence[str] = (),
) -> Settlement:
    """Split the deposit; every amount an integer, nothing lost."""
    if fixed_reward < 0 or variable_pool < 0:
        raise ValueError("rewards must be non-negative")
    unknown = (set(contributions_micro) | set(dropped)) - set(participants)
    if unknown:
        raise ValueError(f"contributions or drops for non-participants: {sorted(unknown)}")
    if set(contributions_micro) & set(dropped):
        raise ValueError("a dropped trainer has no contribution")
    deposit = deposit_for(fixed_reward, len(participants), variable_pool)
    gain = min(max(mse0_micro - mse_final_micro, 0), mse0_micro)
    variable = variable_pool * gain // mse0_micro if mse0_micro > 0 else 0
    positive = {a: c for a, c in contributions_micro.items() if c > 0}
    total = sum(positive.values())
    payments = {a: fixed_reward for a in participants if a not in dropped}
    paid_variable = 0
    if total > 0:
        for a, c in positive.items():
            share = variable * c // total
            payments[a] += share
            paid_variable += share
    refund = deposit - sum(payments.values())
    return Settlement(deposit=deposit, payments=payments, refund=refund, variable_paid=paid_variable)
