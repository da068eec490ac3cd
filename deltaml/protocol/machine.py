"""Transition tables and the one step function every role uses.

Theory of operation: each role keeps one state object per job with a
``phase``. Its table maps ``(phase, message type)`` to a handler and to the
phases that handler may leave the job in. :func:`step` copies the state, runs
the handler on the copy and returns ``(new state, outgoing messages)``; if
the pair is not in the table, or the handler raises, the caller keeps the old
state, so a bad message never loses anything already accepted. Handlers do
no I/O: ids, time and randomness come from the :class:`Context`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Generic, Mapping, TypeVar

from .errors import InvalidTransition, JobOver, ProtocolError
from .messages import Envelope
from .randomness import SYSTEM_RANDOM, RandomSource

S = TypeVar("S")
Handler = Callable[[Any, Envelope, "Context"], list[Envelope]]


@dataclass
class Context:
    """Injected sources of ids, time and randomness, and the sender's name."""

    name: str
    rng: RandomSource = SYSTEM_RANDOM
    clock: Callable[[], float] = lambda: 0.0
    ids: Callable[[], str] | None = None
    wallet: Any = None  # a chain.Wallet for parties that sign transactions
    # how a handler applies a pure function to independent per-model inputs: a loop here, a process
    # pool in a daemon (deltaml.agents.workers); the results are the same
    map: Callable[[Callable, list], list] = lambda fn, items: [fn(x) for x in items]

    def __post_init__(self) -> None:
        if self.ids is None:  # 128 random bits: unique across agents, reproducible from a seeded rng
            self.ids = lambda: format(self.rng.getrandbits(128), "032x")

    def message(self, job_id: str, round_: int, recipient: str, payload: Any,
                correlation_id: str | None = None) -> Envelope:
        """A new envelope from this party."""
        return Envelope(message_id=self.ids(), correlation_id=correlation_id, job_id=job_id,
                        round=round_, sender=self.name, recipient=recipient, payload=payload)

    def reply(self, to: Envelope, payload: Any, round_: int | None = None) -> Envelope:
        """An answer to ``to``, correlated with it."""
        return self.message(to.job_id, to.round if round_ is None else round_, to.sender, payload,
                            correlation_id=to.message_id)


@dataclass(frozen=True)
class Transition:
    """A handler and the phases it may leave the job in."""

    handler: Handler
    to: frozenset


#: The phases every role ends a job in: a message they do not take came too late, not out of turn.
ENDED = ("FINISHED", "FAILED")


class Machine(Generic[S]):
    """A role's transition table."""

    def __init__(self, role: str, table: Mapping[tuple[Enum, str], Transition]) -> None:
        self.role = role
        self.table = dict(table)

    def accepts(self, phase: Enum, message_type: str) -> bool:
        """Whether ``message_type`` is defined in ``phase``."""
        return (phase, message_type) in self.table

    def step(self, state: S, message: Envelope, ctx: Context) -> tuple[S, list[Envelope]]:
        """Apply one message; raise :class:`InvalidTransition` if it is not defined."""
        phase = state.phase  # type: ignore[attr-defined]
        transition = self.table.get((phase, message.type))
        if transition is None:
            if phase.name in ENDED:
                raise JobOver(f"{self.role}: '{message.type}' arrived after the job ended ({phase.name})")
            raise InvalidTransition(f"{self.role}: '{message.type}' is not accepted in phase {phase.name}")
        new = copy.deepcopy(state)
        outgoing = transition.handler(new, message, ctx)
        if new.phase not in transition.to:  # type: ignore[attr-defined]
            raise ProtocolError(f"{self.role}: handler left phase {new.phase.name} outside its table")
        return new, outgoing


def table(*rows: tuple[Enum | tuple[Enum, ...], str, Handler, tuple[Enum, ...]]) -> dict:
    """Build a table from rows ``(from phase(s), message type, handler, to phases)``."""
    out: dict = {}
    for phases, msg_type, handler, to in rows:
        for phase in phases if isinstance(phases, tuple) else (phases,):
            key = (phase, msg_type)
            if key in out:
                raise ValueError(f"duplicate transition {key}")
            out[key] = Transition(handler, frozenset(to))
    return out


def require(condition: bool, reason: str) -> None:
    """Refuse a message that breaks the protocol."""
    if not condition:
        raise ProtocolError(reason)


def natural_key(name: str) -> tuple:
    """Sort ``owner-2`` before ``owner-10``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


FULL_MODEL = "all"


def without(owner: str) -> str:
    """Id of the leave-one-out model that excludes ``owner``."""
    return f"without:{owner}"


def is_eval_round(round_: int, rounds: int, eval_every: int) -> bool:
    """Rounds whose model is evaluated: the start, every ``eval_every``, and the last."""
    return round_ == 0 or round_ == rounds or round_ % eval_every == 0


def owner_names(count: int) -> list[str]:
    """The names a demo gives its owners: ``owner-1`` … ``owner-<count>``."""
    return [f"owner-{i}" for i in range(1, count + 1)]


def loo_trainers(spec, trainers: list[str]) -> list[str]:
    """Trainers with a leave-one-out model: all of them, or none if the job does not measure contributions."""
    return list(trainers) if spec.leave_one_out else []


def model_ids(spec, trainers: list[str]) -> list[str]:
    """The models a job trains: the full model and, if it measures contributions, one without each trainer."""
    return [FULL_MODEL, *(without(t) for t in loo_trainers(spec, trainers))]


def eval_models(spec, round_: int, trainers: list[str]) -> list[str]:
    """Models evaluated at ``round_``: all of them at the end (for leave-one-out), else the full model."""
    return model_ids(spec, trainers) if round_ == spec.rounds else [FULL_MODEL]
