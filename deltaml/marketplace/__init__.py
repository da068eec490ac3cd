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

:mod:`.job` is imported with the package; the rest when a name of theirs is first
asked for (PEP 562), so ``deltaml demo`` can check its flags without loading the
agents, the broker's client and the chain (a second of imports).
"""

from __future__ import annotations

import importlib

from .job import DemoConfig, Progress, baselines, check_config, make_spec, poison, prepare_parts

_LATER = {"chain_report": "demo", "run_demo": "demo", "run_memory": "demo", "memory_job": "memory",
          "memory_market": "memory", "withdrawals": "memory", "run_plain": "plain"}

__all__ = ["DemoConfig", "Progress", "baselines", "chain_report", "check_config", "make_spec", "memory_job",
           "memory_market", "poison", "prepare_parts", "run_demo", "run_memory", "run_plain", "withdrawals"]


def __getattr__(name: str):
    module = _LATER.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
