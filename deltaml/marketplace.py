"""A whole marketplace in one process: the pure cores wired by an in-process router.

Every message is encoded to bytes and decoded again on its way, exactly as on
a broker, so the wire format is exercised. A message a core refuses is kept
with its reason (the router's dead letters) and the run goes on.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .data import Dataset, DataError, demo_split, load
from .protocol import messages as m
from .protocol.aggregator import AggregatorCore
from .protocol.buyer import BuyerCore
from .protocol.errors import ProtocolError
from .protocol.linear import gradient_descent, least_squares, sufficient_stats
from .protocol.machine import Context
from .protocol.owner import OwnerCore, OwnerData
from .protocol.paillier import PrivateKey, PublicKey, generate_keypair


@dataclass(frozen=True)
class DemoConfig:
    """The flags of ``deltaml demo`` (DESIGN §5)."""

    owners: int = 5
    validators: int = 1
    rounds: int = 100
    lr: float = 1.5
    eval_every: int = 10
    key_bits: int = 2048
    dataset: str = "diabetes"
    poison_owner: int | None = None
    fixed_reward_wei: int = 10**16
    variable_pool_wei: int = 10**18
    frac_bits: int = 32
    magnitude_bits: int = 60


@dataclass
class Router:
    """Delivers envelopes FIFO to named cores; ``owners`` is a broadcast."""

    cores: dict[str, object]
    owners: list[str]
    on_progress: Callable[[m.Envelope], None] = lambda env: None
    dead_letters: list[tuple[m.Envelope, str]] = field(default_factory=list)
    delivered: int = 0

    def run(self, first: list[m.Envelope]) -> None:
        queue = deque(first)
        while queue:
            env = m.decode(m.encode(queue.popleft()))
            if env.recipient == "progress":
                self.on_progress(env)
                continue
            targets = self.owners if env.recipient == "owners" else [env.recipient]
            for name in targets:
                core = self.cores.get(name)
                if core is None:
                    self.dead_letters.append((env, f"no such recipient {name}"))
                    continue
                try:
                    queue.extend(core.handle(env))
                    self.delivered += 1
                except ProtocolError as exc:
                    self.dead_letters.append((env, str(exc)))


def owner_names(count: int) -> list[str]:
    return [f"owner-{i}" for i in range(1, count + 1)]


def poison(part: Dataset, seed: int = 1) -> Dataset:
    """The same rows with their targets shuffled."""
    y = np.random.default_rng(seed).permutation(part.y)
    return Dataset(part.features, part.target, part.X, y)


def prepare_parts(config: DemoConfig) -> tuple[Dataset, list[Dataset]]:
    """Load and split the data; apply ``--poison-owner``."""
    data = load(config.dataset)
    if not 1 <= config.validators < config.owners:
        raise DataError("need at least one validator and one trainer")
    parts = demo_split(data, config.owners)
    if config.poison_owner is not None:
        i = config.poison_owner
        if not 1 <= i <= config.owners - config.validators:
            raise DataError(f"--poison-owner must name a trainer (1..{config.owners - config.validators})")
        parts[i - 1] = poison(parts[i - 1])
    return data, parts


def make_spec(config: DemoConfig, data: Dataset, public_hex: str, buyer: str) -> m.JobSpec:
    """The buyer's request for this data's schema."""
    lo, hi = data.X.min(axis=0), data.X.max(axis=0)
    pad = np.maximum(np.abs(hi - lo), 1.0)
    ranges = [(float(a - p), float(b + p)) for a, b, p in zip(lo, hi, pad)]
    return m.JobSpec(buyer=buyer, features=list(data.features), target=data.target, ranges=ranges,
                     owners=config.owners, validators=config.validators, rounds=config.rounds, lr=config.lr,
                     eval_every=config.eval_every, key_bits=config.key_bits, public_key=public_hex,
                     fixed_reward_wei=config.fixed_reward_wei, variable_pool_wei=config.variable_pool_wei,
                     frac_bits=config.frac_bits, magnitude_bits=config.magnitude_bits)


def baselines(parts: list[Dataset], config: DemoConfig) -> dict:
    """Centralised GD and least squares on the trainers' rows, scored on the validators' rows."""
    trainers = [sufficient_stats(p.X, p.y) for p in parts[: config.owners - config.validators]]
    validators = [sufficient_stats(p.X, p.y) for p in parts[config.owners - config.validators:]]
    rows = sum(v.rows for v in validators)

    def mse(w):
        return sum(v.sse(w) for v in validators) / rows

    w_gd = gradient_descent(trainers, config.lr, config.rounds)
    out = {"centralized_gd_mse": mse(w_gd), "closed_form_mse": mse(least_squares(trainers)),
           "centralized_gd_model": w_gd.tolist()}
    names = owner_names(config.owners)
    out["centralized_contributions"] = {
        names[i]: mse(gradient_descent(trainers[:i] + trainers[i + 1:], config.lr, config.rounds)) - out["centralized_gd_mse"]
        for i in range(len(trainers))
    }
    return out


def run_memory(config: DemoConfig, on_progress: Callable[[int, float, float], None] = lambda *a: None,
               keypair: tuple[PublicKey, PrivateKey] | None = None) -> dict:
    """Run one job through the pure cores; return the DESIGN §5 report."""
    started = time.perf_counter()
    data, parts = prepare_parts(config)
    public, private = keypair or generate_keypair(config.key_bits)
    buyer = BuyerCore(Context("buyer"), private)
    cores: dict[str, object] = {"buyer": buyer, "aggregator": AggregatorCore(Context("aggregator"))}
    names = owner_names(config.owners)
    for name, part in zip(names, parts):
        cores[name] = OwnerCore(Context(name), OwnerData(part.columns, part.table()))
    spec = make_spec(config, data, public.to_hex(), "buyer")
    job_id = uuid.uuid4().hex
    router = Router(cores, names, lambda env: on_progress(env.round, env.payload.mse, time.perf_counter() - started))
    router.run(buyer.open_job(job_id, spec))
    job = buyer.jobs[job_id]
    if job.settlement is None:
        reasons = "; ".join(r for _, r in router.dead_letters[:3]) or job.reason or "no result"
        raise RuntimeError(f"job did not finish: {reasons}")
    agg_job = cores["aggregator"].jobs[job_id]
    report = {
        "job_id": job_id, "bus": "memory", "dataset": config.dataset,
        "rounds": config.rounds, "owners": config.owners, "validators": config.validators,
        "lr": config.lr, "eval_every": config.eval_every, "key_bits": public.bits,
        "mse_history": [[r, mse] for r, mse in agg_job.mse_history],
        "final_mse": job.published[config.rounds]["all"],
        **baselines(parts, config),
        "model": list(job.model),
        "contributions": job.contributions,
        "payments_wei": job.settlement.payments,
        "deposit_wei": job.settlement.deposit,
        "refund_wei": job.settlement.refund,
        "messages_delivered": router.delivered,
        "messages_refused": [[e.type, reason] for e, reason in router.dead_letters],
    }
    report["wall_seconds"] = time.perf_counter() - started
    return report
