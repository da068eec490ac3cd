"""Jobs an aggregator lost: what it says and does for a job it does not know.

Theory of operation: an aggregator restarted without the ``--state-dir`` it
ran a job with no longer knows the job, while its parties go on sending it
their replies and questions. Each party that sends one of the messages a
party sends only inside a job (``ANSWERED``) is told once that the job cannot
go on; later ones are refused quietly. The first word of a lost job also
asks the ledger where its escrow stands (a view on the contract: no gas, no
nonce), and only an escrow that names this aggregator and is not settled is
given up and settled, so the buyer's deposit comes back at once rather than
at the deadline. Nothing is signed on the word of whoever sends a message for
a job id of their choosing: a refused transaction would cost gas and leave a
gap in the nonces that fails what the aggregator signs next. The memory of
lost jobs is bounded (a flood of made-up job ids forgets the oldest).
"""

from __future__ import annotations

from . import messages as m
from .chain import LEDGER, job_key, same_address
from .errors import JobOver
from .machine import Context, require

REMEMBERED = 10_000  # lost jobs whose parties it remembers telling (the oldest forgotten first)
#: What a party sends only inside a job it is working on: for a job this aggregator does not know, an answer.
ANSWERED = {"join_request", "role_accepted", "gradient_reply", "refresh_reply", "eval_reply", "metric_reply",
            "job_query"}
GIVABLE_UP = ("Open", "Staffed", "Training")  # the escrow states ``abandon`` accepts


class LostJobs:
    """Who has been told of each lost job, and the ledger's answers awaited on their escrows."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.told: dict[str, set[str]] = {}  # lost job → parties told
        self.asked: dict[str, str] = {}  # query message id → lost job, until the ledger answers

    def memory(self) -> tuple[dict, dict]:
        """Who was told and what the ledger was asked: checkpointed with the aggregator's jobs, so
        a restart does not tell a party twice nor refuse the ledger's answer to a question in flight
        (the escrow then waited for its deadline)."""
        return self.told, self.asked

    def recall(self, memory: tuple[dict, dict]) -> None:
        self.told, self.asked = memory

    def handle(self, env: m.Envelope) -> list[m.Envelope] | None:
        """A message for a job the aggregator does not know: the answer if it is a lost job's, else
        None (a job request, or a message for a job nobody ever ran here)."""
        if env.type == "escrow_standing":
            return self._give_escrow_up(env)
        if env.type in ANSWERED and env.sender not in self.told.get(env.job_id, set()):
            return self._tell(env)
        if env.job_id in self.told and env.type in ("tx_receipt", "chain_event") and env.sender == LEDGER:
            return []  # its escrow given up (the wallet took the receipt; the ledger logs the outcome)
        if env.job_id in self.told and env.type != "job_request":  # its stragglers
            raise JobOver(f"aggregator: {env.type!r} for job {env.job_id}, which this aggregator lost")
        return None

    def _tell(self, env: m.Envelope) -> list[m.Envelope]:
        """Tell the party the job cannot go on; at the job's first word, ask where its escrow stands."""
        out = [self.ctx.reply(env, m.JobFinished(ok=False, reason=(
            f"aggregator {self.ctx.name} does not know job {env.job_id} (restarted without the "
            f"--state-dir it ran the job with?): the job cannot go on")))]
        if env.job_id not in self.told and self.ctx.wallet is not None:
            query = self.ctx.message(env.job_id, 0, LEDGER, m.EscrowQuery())
            self.asked[query.message_id] = env.job_id
            out.append(query)
        self.told.setdefault(env.job_id, set()).add(env.sender)
        for memory in (self.told, self.asked):
            while len(memory) > REMEMBERED:
                del memory[next(iter(memory))]
        return out

    def _give_escrow_up(self, env: m.Envelope) -> list[m.Envelope]:
        """The ledger's word on a lost job's escrow: abandon (unless done before the restart) and
        settle one that names this aggregator and is not settled yet; the buyer is refunded, less
        the fixed rewards if training had verified progress."""
        require(env.sender == LEDGER, "an escrow's standing comes from the ledger")
        require(self.asked.pop(env.correlation_id or "", None) == env.job_id,
                "an escrow's standing nobody asked for (stale?)")
        standing: m.EscrowStanding = env.payload
        wallet = self.ctx.wallet
        if standing.state not in GIVABLE_UP or not same_address(standing.aggregator, wallet.address):
            return []
        key = job_key(env.job_id)
        abandon = [] if standing.abandoned else wallet.call(self.ctx, env.job_id, 0, "abandon", [key, 0])
        return abandon + wallet.call(self.ctx, env.job_id, 0, "settle", [key], participants=standing.enrolled)
