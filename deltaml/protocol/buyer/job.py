"""A job as the buyer sees it, and the refusal every decryption it was not expecting meets."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

from .. import messages as m
from ..errors import DecryptionRefused
from ..settlement import Settlement


class BuyerPhase(Enum):
    REQUESTED = auto()
    TRAINING = auto()
    SETTLING = auto()
    FINISHED = auto()
    FAILED = auto()


@dataclass
class BuyerJob:
    """One job as the buyer sees it."""

    phase: BuyerPhase
    spec: m.JobSpec
    aggregator: str
    trainers: list[str] = field(default_factory=list)
    validators: list[str] = field(default_factory=list)
    roster: list[str] = field(default_factory=list)  # trainers as enrolled on chain
    dropped: list[str] = field(default_factory=list)
    refreshed: set[int] = field(default_factory=set)
    served: dict[int, set[str]] = field(default_factory=dict)
    published: dict[int, dict[str, float]] = field(default_factory=dict)
    model: list[float] | None = None
    contributions: dict[str, float] = field(default_factory=dict)
    settlement: Settlement | None = None
    reason: str = ""
    addresses: dict[str, str] = field(default_factory=dict)
    published_micro: dict[int, dict[str, int]] = field(default_factory=dict)
    settled: bool = False
    payments_wei: dict[str, int] = field(default_factory=dict)
    refund_wei: int = 0
    chain_contributions: dict[str, int] = field(default_factory=dict)
    deposit: str = ""  # the escrow's deposit: "" (none asked), "sent", "made" or "refused"
    withdrawn: bool = False  # the refund's withdraw went through
    withdraw_error: str = ""  # why it did not
    queries: set[str] = field(default_factory=set)  # ids of the buyer's "does it go on?" questions
    lost: bool = False  # the aggregator said it lost the job: an escrow naming it is given up at once

    @property
    def escrow_open(self) -> bool:
        """Whether money of the buyer's may still be in the escrow or on its way back: a deposit
        without its receipt yet, or one made whose job is not settled or whose refund is not
        withdrawn. A buyer that leaves before this is False leaves its refund in the contract."""
        if self.deposit == "sent":
            return True
        if self.deposit != "made" or self.withdraw_error:
            return False
        return not (self.settled and (self.refund_wei == 0 or self.withdrawn))

    @property
    def dim(self) -> int:
        return len(self.spec.features) + 1

    @property
    def buyer_address(self) -> str | None:
        return self.addresses.get(self.spec.buyer)


def refuse_unless(condition: bool, reason: str) -> None:
    """Refuse a decryption the buyer was not expecting."""
    if not condition:
        raise DecryptionRefused(reason)
