"""Building each party's core from what a daemon is given: seeds, data, keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data import load_csv
from ..protocol.aggregator import AggregatorCore
from ..protocol.buyer import BuyerCore
from ..protocol.drbg import Drbg
from ..protocol.machine import Context
from ..protocol.owner import OwnerCore, OwnerData
from ..protocol.paillier import PrivateKey, PublicKey, generate_keypair


def context(name: str, seed: bytes | None = None) -> Context:
    """A context whose randomness and ids come from one seeded DRBG."""
    return Context(name, rng=Drbg(seed))


def owner_core(name: str, data_path: str, auto_accept: bool, seed: bytes | None = None) -> OwnerCore:
    data = load_csv(data_path)
    return OwnerCore(context(name, seed), OwnerData(data.columns, data.table(), auto_accept))


def aggregator_core(name: str = "aggregator", seed: bytes | None = None) -> AggregatorCore:
    return AggregatorCore(context(name, seed))


def buyer_core(name: str, key: PrivateKey, seed: bytes | None = None) -> BuyerCore:
    return BuyerCore(context(name, seed), key)


def save_key(key: PrivateKey, path: str | Path) -> None:
    """Write a private key readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"n": format(key.public.n, "x"), "p": format(key.p, "x"), "q": format(key.q, "x")}, fh)


def load_key(path: str | Path) -> PrivateKey:
    raw = json.loads(Path(path).read_text())
    return PrivateKey(PublicKey(int(raw["n"], 16)), int(raw["p"], 16), int(raw["q"], 16))


def new_key(bits: int) -> PrivateKey:
    return generate_keypair(bits)[1]
