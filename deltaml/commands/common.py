"""What every ``deltaml`` command shares: the one-line error, checks of names and paths, the party's key and workers."""

from __future__ import annotations

import json
import math
import os
import re
from decimal import Decimal
from pathlib import Path


class CliError(Exception):
    """A one-line error for the user."""


def _check_names(**names: str) -> None:
    """Party names the bus can route to one queue alone: one word of a routing key, and none of the
    names the bus keeps for itself (the owners' fan-out, the progress feed, the ledger), and not an
    address (each queue is bound to its agent's). A name such as ``#`` bound its queue to everyone's
    messages; ``owners``, to every job offer twice."""
    from ..agents.topology import BROADCAST_OWNERS, PROGRESS
    from ..protocol.chain import LEDGER
    from ..protocol.messages import ADDRESS_SHAPE, NAME_PATTERN

    for flag, name in names.items():
        if not re.fullmatch(NAME_PATTERN, name):
            raise CliError(f"--{flag} {name!r}: a party's name is 1 to 128 letters, digits, '-' or '_', "
                           f"beginning with a letter or digit")
        if ADDRESS_SHAPE.fullmatch(name):
            raise CliError(f"--{flag} {name!r}: a party's name may not be an Ethereum address (the bus routes "
                           f"an address to whoever signs as it); choose another")
        if name in (BROADCAST_OWNERS, PROGRESS, LEDGER):
            raise CliError(f"--{flag} {name!r}: the bus keeps that name for itself; choose another")


def _pinned(args) -> dict[str, str]:
    from eth_utils import is_address, to_checksum_address

    pinned = {}
    for item in args.trust:
        name, _, address = item.partition("=")
        if not name or not is_address(address):
            raise CliError(f"--trust {item!r}: expected NAME=0x followed by 40 hex digits")
        pinned[name] = to_checksum_address(address)
    return pinned


def _check_tick(args) -> None:
    """Before anything is loaded: a tick of 0 would spin a core checking deadlines."""
    if not (math.isfinite(args.tick_seconds) and args.tick_seconds > 0):
        raise CliError(f"--tick-seconds {args.tick_seconds}: must be a positive number of seconds")


def _progress(round_: int, mse: float, elapsed: float) -> None:
    print(f"round {round_:>5}  validation MSE {mse:12.4f}  elapsed {elapsed:8.1f}s", flush=True)


def _print_earnings(report: dict) -> None:
    names = {a: n for n, a in report.get("participants", {}).items()}
    print(f"{'owner':<10}{'address':<44}{'contribution':>14}{'paid (wei)':>22}")
    for address, paid in report["payments_wei"].items():
        c = report["contributions"].get(address)
        print(f"{names.get(address, ''):<10}{address:<44}{'validator' if c is None else f'{c:.4f}':>14}{paid:>22}")
    for name in report.get("dropped", []):  # silent in training: left out, paid nothing
        print(f"{name:<10}{report.get('participants', {}).get(name, ''):<44}{'dropped':>14}{0:>22}")
    print(f"refund to buyer {report['refund_wei']} wei of a {report['deposit_wei']} wei deposit "
          f"(paid + refund = {sum(report['payments_wei'].values()) + report['refund_wei']})")


def _check_writable(**paths: Path | None) -> None:
    """Refuse an output file that cannot be written before the job starts: a job's money moves and its
    model arrives only once, and a report or model lost to a typo in a path is not given back."""
    for flag, path in paths.items():
        if path is None:
            continue
        where = path.parent if str(path.parent) else Path(".")
        name = "--" + flag.replace("_", "-")
        if path.is_dir():
            raise CliError(f"{name} {path}: is a directory")
        if not where.is_dir():
            raise CliError(f"{name} {path}: no directory {where}")
        if not os.access(where, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise CliError(f"{name} {path}: not writable")


def _spec_error(exc) -> str:
    """The first of a job spec's validation errors, named by its flag: ``--rounds: must be ...``."""
    error = exc.errors()[0]
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return message
    field = str(error["loc"][0])
    value = error.get("input")
    return f"--{field.replace('_', '-')} {value}: {message[0].lower()}{message[1:]}"


def _write_report(report: dict, path: Path | None) -> None:
    if path:
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {path}")


def _wallet(args, role: str | None = None):
    """The party's key: ``--key``'s file; for a daemon with ``--state-dir`` and no ``--key``, the one
    it keeps there (``<role>.key``, made on first use); else one for this run. A daemon restarted
    from its state must sign as the one before it: the parties take its word from that address, and
    the escrow credits it — restarted with a new key, a ledger's messages were refused as forged,
    and an owner's pay went to an address whose key was gone."""
    from ..agents.checkpoint import Checkpoint
    from ..agents.parties import load_wallet

    # a paying party's ceilings and pins (the ledger signs no transaction), checked before a key file is made
    paying = getattr(args, "max_fee_gwei", None) is not None
    terms = (*_ceilings(args.max_fee_gwei, args.max_tip_gwei), *_pins(args.escrow, args.chain_id)) if paying else None
    path, state_dir = args.key, getattr(args, "state_dir", None)
    if path is None and state_dir is not None and role is not None:
        Checkpoint(state_dir).close()  # the directory made, or refused in one line, as its checkpoint would be
        path = Path(state_dir) / f"{role}.key"
    try:
        wallet = load_wallet(path)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if terms is not None:
        wallet.max_fee, wallet.max_tip, wallet.escrow, wallet.escrow_chain = terms
    return wallet


def _pins(escrow: str | None, chain_id: int | None) -> tuple[str | None, int | None]:
    """``--escrow`` and ``--chain-id`` as a wallet takes them, or a :class:`CliError`."""
    from eth_utils import is_address, to_checksum_address

    if escrow is not None and not is_address(escrow):
        raise CliError(f"--escrow {escrow}: not an Ethereum address (0x and 40 hex digits)")
    if chain_id is not None and chain_id < 1:
        raise CliError(f"--chain-id {chain_id}: expected a chain id, 1 or more")
    return (None if escrow is None else to_checksum_address(escrow)), chain_id


def _ceilings(fee: Decimal, tip: Decimal | None) -> tuple[int, int]:
    """``--max-fee-gwei`` and ``--max-tip-gwei`` in wei (the tip's by default the wallet's, or the
    fee's if lower), or a :class:`CliError` saying what is wrong."""
    from ..protocol.fees import GWEI, MAX_TIP

    if not fee.is_finite() or fee * GWEI < 1:
        raise CliError(f"--max-fee-gwei {fee:f}: expected at least one wei (0.000000001 gwei)")
    if tip is None:
        return int(fee * GWEI), min(MAX_TIP, int(fee * GWEI))
    if not tip.is_finite() or tip < 0 or tip > fee:
        raise CliError(f"--max-tip-gwei {tip:f}: expected 0 to --max-fee-gwei ({fee:f}): the tip is part of the fee")
    return int(fee * GWEI), int(tip * GWEI)


def _workers(args, core, pub=None):
    """The party's worker pool for its per-model work, made before any thread starts (workers.py)."""
    from ..agents.workers import workers_for

    if args.workers < 0:
        raise CliError(f"--workers {args.workers}: expected 0 (one per core) or more")
    workers = workers_for(args.workers, pub)
    if workers is not None:
        core.ctx.map = workers.map
    return workers
