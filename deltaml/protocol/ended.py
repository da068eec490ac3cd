"""What a long-running party keeps of the jobs that ended.

Theory of operation: a daemon serves job after job and, with a state
directory, checkpoints everything it holds after every step
(:mod:`deltaml.agents.checkpoint`). Kept whole, each job it ever ran made
every later step dearer: an aggregator's ended job still held its last
round's gradient replies and its models (about 130 kB), so after 100 jobs
each message cost some 120 ms of pickling and writing, and memory grew
without end. Now a job that ends sheds its working data (ciphertexts, an
owner's statistics, masks) at once (``shed()`` on the job), and a party keeps
only its newest :data:`KEPT` ended jobs. Older ones are forgotten but for
their ids and how they ended (the newest :data:`REMEMBERED`), so a message
that straggles in for one is refused as late, and an owner asking after one
is told how it ended, rather than either being taken for a job never seen
(an aggregator would think it had lost the job).
"""

from __future__ import annotations

from typing import Protocol

#: Ended jobs a party keeps whole, the newest: they answer questions after their end and take
#: the chain's late word (an escrow settled, a payment credited).
KEPT = 100
#: Forgotten jobs whose ids and outcomes a party remembers (about 100 bytes each).
REMEMBERED = 10_000


class Job(Protocol):
    def outcome(self) -> tuple[bool, str] | None: ...

    def shed(self) -> None: ...


class EndedJobs:
    """How the jobs a party forgot ended, by job id (oldest first)."""

    def __init__(self) -> None:
        self.forgotten: dict[str, tuple[bool, str]] = {}
        #: the ended jobs still kept, in the order they were seen to end: each is shed once, when it
        #: joins. Not checkpointed: a restored party's first :meth:`retire` finds them again.
        self.kept: dict[str, tuple[bool, str]] = {}

    def retire(self, jobs: dict[str, Job]) -> None:
        """Shed the working data of each job in ``jobs`` that has ended since the last call, and
        forget all but the newest :data:`KEPT` ended jobs. Called after every message: a job
        already kept costs one lookup."""
        for job_id, job in jobs.items():
            if job_id not in self.kept:
                outcome = job.outcome()
                if outcome is not None:
                    job.shed()
                    self.kept[job_id] = outcome
        while len(self.kept) > KEPT:
            job_id = next(iter(self.kept))
            self.forgotten[job_id] = self.kept.pop(job_id)
            del jobs[job_id]
        while len(self.forgotten) > REMEMBERED:
            del self.forgotten[next(iter(self.forgotten))]

    def outcome(self, job_id: str) -> tuple[bool, str] | None:
        """``(ok, reason)`` of a job that ended and was forgotten, else None."""
        return self.forgotten.get(job_id)
