"""What the aggregator keeps of a job: its phase, its models, who does what (:class:`AggJob`).

Plain data. The package's modules step it — :mod:`.training`, :mod:`.evaluation`,
:mod:`.events` — and end it (:mod:`.ending`); the core holds one per job and
checkpoints them (pickled: the classes keep their names in
``deltaml.protocol.aggregator`` too, so a checkpoint of the single module they
came from still loads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

from .. import messages as m
from ..fixedpoint import FixedPoint
from ..machine import FULL_MODEL, without
from ..paillier import PublicKey
from ..refresh import RefreshMasks


class AggPhase(Enum):
    RECRUITING = auto()
    STARTING = auto()
    TRAINING = auto()
    REFRESHING = auto()
    EVALUATING = auto()
    VERIFYING = auto()
    SETTLING = auto()
    CLOSING = auto()
    FINISHED = auto()
    FAILED = auto()


@dataclass
class Evaluation:
    """An evaluation in flight: the models asked for and the validators' replies so far."""

    targets: list[str]
    replies: dict[str, m.Envelope] = field(default_factory=dict)
    waited: float = 0.0  # seconds since it last heard from a validator or the buyer
    #: the scale of ``[SSE]`` a validator's reply must have (None in a checkpoint from before it was kept)
    sse_scale_bits: int | None = None


@dataclass
class AggJob:
    """One job as the aggregator runs it."""

    phase: AggPhase
    spec: m.JobSpec
    buyer: str
    models: dict[str, list[int]]
    scale_bits: int
    round: int = 0
    joined: dict[str, int] = field(default_factory=dict)
    trainers: list[str] = field(default_factory=list)
    validators: list[str] = field(default_factory=list)
    replies: dict[str, m.Envelope] = field(default_factory=dict)
    masks: dict[str, RefreshMasks] = field(default_factory=dict)
    evaluated_round: int = -1  # the last round whose evaluation was started
    evals: dict[int, Evaluation] = field(default_factory=dict)  # evaluations in flight, by round
    mse_history: list[tuple[int, float]] = field(default_factory=list)
    final_mse: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    addresses: dict[str, str] = field(default_factory=dict)
    training_started: bool = False
    settled: bool = False
    roster: list[str] = field(default_factory=list)  # trainers as enrolled on chain (model indices)
    dropped: list[str] = field(default_factory=list)
    failing: dict[str, str] = field(default_factory=dict)  # trainers that failed this round → why; dropped as it steps
    on_chain: bool = False  # the escrow exists: a failure abandons it
    settle_request: m.TxRequest | None = None  # the signed settle, kept until asked of the ledger again
    idle: float = 0.0  # seconds since the job last accepted a message

    @property
    def codec(self) -> FixedPoint:
        return FixedPoint(self.spec.frac_bits, self.spec.magnitude_bits)

    @property
    def public_key(self) -> PublicKey:
        return PublicKey.from_hex(self.spec.public_key)

    def outcome(self) -> tuple[bool, str] | None:
        """``(ok, reason)`` once the job has ended, else None."""
        if self.phase not in (AggPhase.FINISHED, AggPhase.FAILED):
            return None
        return self.phase is AggPhase.FINISHED, self.reason

    def shed(self) -> None:
        """Drop what only a running job needs: the ciphertexts of its models and replies, its masks."""
        self.models = {mid: [] for mid in self.models}
        self.replies, self.masks, self.evals = {}, {}, {}

    def members(self, model: str) -> list[str]:
        """Trainers whose data a model is trained on."""
        if model == FULL_MODEL:
            return list(self.trainers)
        return [t for t in self.trainers if without(t) != model]

    def models_of(self, trainer: str) -> list[str]:
        """Models a trainer takes part in."""
        return [mid for mid in self.models if trainer in self.members(mid)]


def quorum_holds(job: AggJob, leaving: list[str]) -> bool:
    """Whether the job may go on without these trainers: it has a quorum and enough stay."""
    return bool(job.spec.quorum) and len(job.trainers) - len(leaving) >= job.spec.quorum


def fits(job: AggJob, check) -> bool:
    s = job.spec
    return check(job.scale_bits, s.frac_bits, s.magnitude_bits, job.public_key.bits)


WAITING_FOR = {
    AggPhase.RECRUITING: "owners to join", AggPhase.STARTING: "participants to accept and confirm",
    AggPhase.TRAINING: "trainers' gradients", AggPhase.REFRESHING: "the buyer's refresh",
    AggPhase.EVALUATING: "validators' evaluations", AggPhase.VERIFYING: "the buyer's metric",
    AggPhase.SETTLING: "the chain to report the escrow settled", AggPhase.CLOSING: "the buyer to close the job",
}
