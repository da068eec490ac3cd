"""A whole marketplace on one machine: every party an agent, on the memory bus or RabbitMQ.

``--bus memory`` runs all agents in one event loop on :class:`MemoryBus`;
``--bus amqp`` starts the aggregator and each owner as a separate OS process
(``deltaml aggregator``, ``deltaml owner``) and runs the buyer here, all
talking through RabbitMQ. Either way the report adds plain-numpy baselines
computed on the same split, so a run proves itself.

The package: :mod:`.job` (the flags, the data, the spec, the baselines),
:mod:`.memory` (the memory bus's marketplace), :mod:`.daemons` (the broker's:
forked daemons and the queues a run owns), :mod:`.demo` (a job end to end and
its report), :mod:`.plain` (the same job without encryption).
"""

from .demo import chain_report, run_demo, run_memory
from .job import DemoConfig, Progress, baselines, check_config, make_spec, poison, prepare_parts
from .memory import memory_job, memory_market, withdrawals
from .plain import run_plain

__all__ = ["DemoConfig", "Progress", "baselines", "chain_report", "check_config", "make_spec", "memory_job",
           "memory_market", "poison", "prepare_parts", "run_demo", "run_memory", "run_plain", "withdrawals"]
