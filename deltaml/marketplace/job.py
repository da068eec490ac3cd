"""What a demo's job is: its flags (:class:`DemoConfig`), the data split among its owners, the
buyer's spec, and the plain-numpy baselines that let a run prove itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..data import Dataset, demo_split, load
from ..protocol import messages as m
from ..protocol.linear import beyond_bound, gradient_descent, least_squares, sufficient_stats
from ..protocol.machine import owner_names
from ..protocol.settlement import DEFAULT_DEADLINE
from ..settings import ConfigError


Progress = Callable[[int, float, float], None]


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
    chain: str = "embedded"
    round_timeout: float = 600.0
    quorum: int = 0


def poison(part: Dataset, seed: int = 1) -> Dataset:
    """The same rows with their targets shuffled."""
    return Dataset(part.features, part.target, part.X, np.random.default_rng(seed).permutation(part.y))


def check_config(config: DemoConfig) -> None:
    """The job's own limits (:class:`~deltaml.protocol.messages.JobSpec`) at the front door, before
    any process starts: one line naming the flag instead of a validation error from inside the job."""
    if not 1 <= config.validators < config.owners:
        raise ConfigError("need at least one validator and one trainer")
    if not 1 <= config.rounds <= 100_000:
        raise ConfigError(f"--rounds must be between 1 and 100000, got {config.rounds}")
    if config.eval_every < 1:
        raise ConfigError(f"--eval-every must be at least 1, got {config.eval_every}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"--lr must be a positive number, got {config.lr}")
    trainers = config.owners - config.validators
    if config.poison_owner is not None and not 1 <= config.poison_owner <= trainers:
        raise ConfigError(f"--poison-owner must name a trainer (1..{trainers})")
    if not 0 <= config.quorum <= trainers:
        raise ConfigError(f"--quorum must be between 0 and the {trainers} trainers, got {config.quorum}")
    if not (math.isfinite(config.round_timeout) and config.round_timeout > 0):
        raise ConfigError(f"--round-timeout must be a positive number of seconds, got {config.round_timeout}")


def prepare_parts(config: DemoConfig) -> tuple[Dataset, list[Dataset]]:
    """Check the flags, load and split the data; apply ``--poison-owner``."""
    check_config(config)
    data = load(config.dataset)
    parts = demo_split(data, config.owners)
    if config.poison_owner is not None:
        parts[config.poison_owner - 1] = poison(parts[config.poison_owner - 1])
    for name, part in zip(owner_names(config.owners), parts):  # an owner would decline the job: say why now
        reason = beyond_bound(sufficient_stats(part.X, part.y), config.magnitude_bits)
        if reason:
            raise ConfigError(f"{config.dataset}: {name} cannot take part: {reason}")
    return data, parts


def make_spec(config: DemoConfig, data: Dataset, public_hex: str, buyer: str, escrow: bool = True) -> m.JobSpec:
    """The buyer's request for this data's schema."""
    lo, hi = data.X.min(axis=0), data.X.max(axis=0)
    pad = np.maximum(np.abs(hi - lo), 1.0)
    ranges = [(float(a - p), float(b + p)) for a, b, p in zip(lo, hi, pad)]
    return m.JobSpec(buyer=buyer, features=list(data.features), target=data.target, ranges=ranges,
                     owners=config.owners, validators=config.validators, rounds=config.rounds, lr=config.lr,
                     eval_every=config.eval_every, key_bits=config.key_bits, public_key=public_hex,
                     fixed_reward_wei=config.fixed_reward_wei, variable_pool_wei=config.variable_pool_wei,
                     frac_bits=config.frac_bits, magnitude_bits=config.magnitude_bits,
                     escrow=escrow, deadline=int(time.time()) + DEFAULT_DEADLINE if escrow else 0,
                     round_timeout=config.round_timeout, quorum=config.quorum)


def baselines(parts: list[Dataset], config: DemoConfig) -> dict:
    """Centralised GD and least squares on the trainers' rows, scored on the validators' rows."""
    split = config.owners - config.validators
    trainers = [sufficient_stats(p.X, p.y) for p in parts[:split]]
    validators = [sufficient_stats(p.X, p.y) for p in parts[split:]]
    rows = sum(v.rows for v in validators)

    def mse(w):
        return sum(v.sse(w) for v in validators) / rows

    w_gd = gradient_descent(trainers, config.lr, config.rounds)
    full = mse(w_gd)

    def without(i):  # the model trained on the others: the initial model if there are none
        others = trainers[:i] + trainers[i + 1:]
        return gradient_descent(others, config.lr, config.rounds) if others else np.zeros_like(w_gd)

    names = owner_names(config.owners)
    loo = {names[i]: mse(without(i)) - full for i in range(len(trainers))}
    return {"centralized_gd_mse": full, "closed_form_mse": mse(least_squares(trainers)),
            "centralized_gd_model": w_gd.tolist(), "centralized_contributions": loo}
