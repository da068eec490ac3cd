"""Building each party's core from what a daemon is given: seeds, data, keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

from eth_keys.constants import SECPK1_N

from ..data import load_csv
from ..protocol.aggregator import AggregatorCore
from ..protocol.buyer import BuyerCore
from ..protocol.chain import Wallet
from ..protocol.drbg import Drbg
from ..protocol.machine import Context
from ..protocol.owner import OwnerCore, OwnerData
from ..protocol.paillier import PrivateKey, PublicKey, generate_keypair


def context(name: str, seed: bytes | None = None, wallet: Wallet | None = None) -> Context:
    """A context whose randomness and ids come from one seeded DRBG."""
    return Context(name, rng=Drbg(seed), wallet=wallet)


def owner_core(name: str, data_path: str, auto_accept: bool, seed: bytes | None = None,
               wallet: Wallet | None = None) -> OwnerCore:
    data = load_csv(data_path)
    return OwnerCore(context(name, seed, wallet), OwnerData(data.columns, data.table(), auto_accept))


def aggregator_core(name: str = "aggregator", seed: bytes | None = None,
                    wallet: Wallet | None = None) -> AggregatorCore:
    return AggregatorCore(context(name, seed, wallet))


def buyer_core(name: str, key: PrivateKey, seed: bytes | None = None, wallet: Wallet | None = None) -> BuyerCore:
    return BuyerCore(context(name, seed, wallet), key)


def load_wallet(path: str | Path | None) -> Wallet:
    """The Ethereum key in ``path``, created (mode 0600) on first use; a throwaway key without a path.

    Like ssh with a private key, a file that others may read is refused rather than used: whoever
    can read it can sign for this party and withdraw what it is paid."""
    if path is None:
        return Wallet(private_key=os.urandom(32))
    path = Path(path)
    if not path.exists():
        key = os.urandom(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"address": Wallet(private_key=key).address, "private_key": key.hex()}, fh)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ValueError(f"{path}: a private key others may read (mode {mode:o}); chmod 600 {path}")
    try:
        raw = json.loads(path.read_text())
        key = bytes.fromhex(raw["private_key"].removeprefix("0x"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a DeltaML Ethereum key file ({exc})") from None
    if len(key) != 32:
        raise ValueError(f"{path}: an Ethereum private key has 32 bytes, not {len(key)}")
    if not 0 < int.from_bytes(key, "big") < SECPK1_N:
        raise ValueError(f"{path}: not a secp256k1 private key (zero, or not below the curve's order)")
    return Wallet(private_key=key)


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
