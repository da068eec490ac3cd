"""The buyer's state machine, and its guard against being a decryption oracle.

Theory of operation: the buyer opens a job with its public key and an
encryption of the zero model (REQUESTED). Once the aggregator names the
participants (TRAINING) the buyer answers exactly three kinds of request,
each only when the job is at a point that calls for it:

- a refresh: at most one per round, for the job's models, with a range that
  fits the key; the buyer sees only masked values;
- a masked product: only from a named validator, only at an evaluation round,
  once per validator and round, for the models due then;
- a metric: once per evaluation round, only for a ciphertext that is the
  homomorphic sum of the ``[SSE_v]`` of exactly the validators it served.

Anything else raises :class:`DecryptionRefused`, which leaves the state as it
was. The final model is decrypted once, after the last evaluation; then the
buyer computes leave-one-out contributions from the metrics it published
itself, settles the payment split and closes the job (FINISHED).

The package: :mod:`.job` (what is kept of a job), :mod:`.decryptions` (the
four things the buyer decrypts: the oracle guard), :mod:`.escrow` (the rest of
the job's course); here the transition table and the core.
"""

from __future__ import annotations

import numpy as np

from .. import messages as m
from ..chain import LEDGER, ChainParty
from ..machine import Context, Machine, table
from ..paillier import PrivateKey
from .decryptions import on_metric, on_products, on_refresh, on_result
from .escrow import on_chain_event, on_dropped, on_end, on_participants, on_receipt
from .job import BuyerJob, BuyerPhase, refuse_unless

__all__ = ["BUYER_TABLE", "BuyerCore", "BuyerJob", "BuyerPhase", "refuse_unless"]


B = BuyerPhase
BUYER_TABLE = table(
    (B.REQUESTED, "participants", on_participants, (B.TRAINING,)),
    (B.TRAINING, "refresh_request", on_refresh, (B.TRAINING, B.FAILED)),
    (B.TRAINING, "product_request", on_products, (B.TRAINING, B.FAILED)),
    (B.TRAINING, "metric_request", on_metric, (B.TRAINING,)),
    (B.TRAINING, "job_result", on_result, (B.FINISHED, B.SETTLING)),
    (B.TRAINING, "trainer_dropped", on_dropped, (B.TRAINING,)),
    ((B.REQUESTED, B.TRAINING, B.SETTLING, B.FAILED), "job_finished", on_end, (B.FAILED,)),
    (tuple(B), "chain_event", on_chain_event, tuple(B)),
    (tuple(B), "tx_receipt", on_receipt, tuple(B)),
)


class BuyerCore(ChainParty):
    """The buyer's pure core: its key, its jobs, one step per message."""

    def __init__(self, ctx: Context, key: PrivateKey) -> None:
        self.ctx = ctx
        self.key = key
        self.wallet = ctx.wallet
        self.jobs: dict[str, BuyerJob] = {}
        self.machine = Machine("buyer", {
            k: type(t)(lambda job, env, c, h=t.handler: h(job, env, c, self.key), t.to)
            for k, t in BUYER_TABLE.items()
        })

    def open_job(self, job_id: str, spec: m.JobSpec, aggregator: str = "aggregator") -> list[m.Envelope]:
        """Start a job: the request with an encryption of the zero model."""
        if job_id in self.jobs:
            raise ValueError(f"job {job_id} already exists")
        if spec.public_key != self.key.public.to_hex() or spec.buyer != self.ctx.name:
            raise ValueError("the job's key and buyer must be this buyer's")
        if spec.escrow and self.wallet is None:
            raise ValueError("a job with escrow needs the buyer's Ethereum key")
        zero = [self.key.encrypt(0, self.ctx.rng) for _ in range(len(spec.features) + 1)]
        self.jobs[job_id] = BuyerJob(phase=BuyerPhase.REQUESTED, spec=spec, aggregator=aggregator)
        return [self.ctx.message(job_id, 0, aggregator, m.JobRequest(spec=spec, initial_model=zero))]

    def give_up(self, job_id: str, reason: str) -> list[m.Envelope]:
        """Leave a job before its result: the aggregator is told, so the job ends now for everyone
        (its owners are released, a funded escrow is given up and refunded at once) rather than
        when it next needs the buyer. A job already over, or unknown, is left as it is."""
        job = self._under_way(job_id)
        if job is None:
            return []
        job.phase, job.reason = BuyerPhase.FAILED, reason
        return [self.ctx.message(job_id, 0, job.aggregator, m.Failure(reason=reason))]

    def fault(self, env: m.Envelope) -> list[m.Envelope]:
        """A message of its job the buyer could not handle, its retries spent: the job cannot wait
        for it, so the buyer gives the job up (its log says what went wrong)."""
        job = self.jobs.get(env.job_id)
        if job is None or env.sender not in (job.aggregator, LEDGER, *job.validators):
            return []  # a stranger's message cannot end the buyer's job
        return self.give_up(env.job_id, f"the buyer could not handle {env.sender}'s {env.type} of round {env.round}")

    def ask(self, job_id: str) -> list[m.Envelope]:
        """Ask the aggregator whether a job still going on here goes on there (its daemon is back
        after a stop): one that lost it says so and the job fails, instead of waiting for ever."""
        job = self._under_way(job_id)
        if job is None:
            return []
        query = self.ctx.message(job_id, 0, job.aggregator, m.JobQuery())
        job.queries.add(query.message_id)
        return [query]

    def _under_way(self, job_id: str) -> BuyerJob | None:
        """The job if the buyer has not yet got its result nor seen it end, else None."""
        job = self.jobs.get(job_id)
        return job if job is not None and job.phase in (BuyerPhase.REQUESTED, BuyerPhase.TRAINING) else None

    def _step(self, env: m.Envelope) -> list[m.Envelope]:
        """Apply one message to its job."""
        job = self.jobs.get(env.job_id)
        refuse_unless(job is not None, f"message for unknown job {env.job_id}")
        new, out = self.machine.step(job, env, self.ctx)
        self.jobs[env.job_id] = new
        return out

    def final_model(self, job_id: str) -> np.ndarray | None:
        """The decrypted model of a finished job."""
        model = self.jobs[job_id].model
        return None if model is None else np.array(model)
