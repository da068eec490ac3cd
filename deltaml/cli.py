"""The ``deltaml`` command line (DESIGN §5): daemons, the buyer, the demo, tools."""

from __future__ import annotations

import argparse
import sys
from decimal import Decimal
from pathlib import Path

from .commands.buyer import cmd_buyer_train, cmd_buyer_withdraw
from .commands.common import CliError
from .commands.daemons import cmd_aggregator, cmd_dataset_split, cmd_demo, cmd_ledger, cmd_owner, cmd_replay
from .data import DataError
from .protocol.errors import KeyTooShort, ProtocolError
from .protocol.settlement import DEFAULT_DEADLINE
from .settings import LOG_LEVELS, ConfigError, Settings


def _common(p: argparse.ArgumentParser, settings: Settings, daemon: bool = True) -> None:
    p.add_argument("--amqp-url", default=settings.amqp_url, help="the RabbitMQ broker (DELTAML_AMQP_URL)")
    p.add_argument("--log-format", choices=["console", "json"], default=settings.log_format,
                   help="log lines for a person or one JSON object per line")
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=settings.log_level,
                   help="the least severe lines logged")
    p.add_argument("--trust", action="append", default=[], metavar="NAME=ADDRESS",
                   help="only ADDRESS may sign as party NAME (e.g. aggregator=0x..., ledger=0x...); repeatable")
    if not daemon:
        return
    p.add_argument("--trace", type=Path, default=None, help="append every message in and out (JSON lines)")
    p.add_argument("--precompute", action=argparse.BooleanOptionalAction, default=settings.precompute,
                   help="compute Paillier obfuscators ahead while idle, on a low-priority thread")


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None,
                   help="checkpoint every step here (SQLite) and resume from it after a crash; without --key, "
                        "the party's key is kept here too (a restart must sign as the same address)")
    p.add_argument("--tick-seconds", type=float, default=1.0, help="how often deadlines are checked, in seconds")


def _workers_option(p: argparse.ArgumentParser, settings: Settings, work: str) -> None:
    p.add_argument("--workers", type=int, default=settings.workers,
                   help=f"processes for {work} (0: one per core; 1: this process only)")


def _key(p: argparse.ArgumentParser, settings: Settings) -> None:
    p.add_argument("--key", type=Path, default=None,
                   help="this party's Ethereum key file, created with mode 0600 if missing")
    _fees(p, settings)


def _gwei(text: str) -> Decimal:
    try:
        return Decimal(text)
    except ArithmeticError:  # decimal.InvalidOperation, which argparse does not take for a bad value
        raise argparse.ArgumentTypeError(f"not a number of gwei: {text!r}") from None


def _fees(p: argparse.ArgumentParser, settings: Settings) -> None:
    """What a paying party's wallet signs, whatever the ledger says: for which escrow and chain
    (``Wallet.foreign``), and up to which prices (``Wallet.follow``)."""
    p.add_argument("--escrow", default=settings.escrow, metavar="ADDRESS",
                   help="sign only calls to this escrow contract (the ledger prints its own when it starts); "
                        "by default the one the ledger names")
    p.add_argument("--chain-id", type=int, default=settings.chain_id, metavar="N",
                   help="sign only for the chain of this id; by default the ledger's")
    p.add_argument("--max-fee-gwei", type=_gwei, default=settings.max_fee_gwei, metavar="GWEI",
                   help="sign no transaction that may cost more than this per gas (an EIP-1559 fee cap, or a "
                        "legacy price), whatever the ledger advises; one the chain will only take above it fails")
    tip = settings.max_tip_gwei if "max_tip_gwei" in settings.model_fields_set else None  # (DELTAML_MAX_TIP_GWEI)
    p.add_argument("--max-tip-gwei", type=_gwei, default=tip, metavar="GWEI",
                   help=f"of which at most this for the block's producer (default: {settings.max_tip_gwei}, or "
                        "--max-fee-gwei if lower)")


class HELP(argparse.HelpFormatter):
    """Help that shows a flag's default when it has one worth saying (not None, False or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or action.required or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


def _job_shape(p: argparse.ArgumentParser, owners, validators, rounds, lr, key_bits: int) -> None:
    """The flags that shape a job, shared by the demo and the buyer (a default of None: required)."""
    def add(flag, kind, default, text):
        p.add_argument(flag, type=kind, default=default, required=default is None, help=text)

    add("--owners", int, owners, "owners taking part, validators included")
    add("--validators", int, validators, "of the owners, how many score the model instead of training it")
    add("--rounds", int, rounds, "gradient steps (1 to 100000)")
    add("--lr", float, lr, "learning rate")
    p.add_argument("--eval-every", type=int, default=10, help="validate the model every this many rounds")
    p.add_argument("--key-bits", type=int, default=key_bits, help="Paillier modulus (2048 or more)")
    p.add_argument("--round-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long the aggregator waits for a phase's replies before it acts on the silence")
    p.add_argument("--quorum", type=int, default=0,
                   help="go on without silent trainers while this many still answer (0: a silent party fails "
                        "the job); the silent are dropped and not paid")


def build_parser() -> argparse.ArgumentParser:
    settings = Settings.from_environment()
    parser = argparse.ArgumentParser(prog="deltaml", description="DeltaML: a privacy-preserving ML marketplace")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run a whole marketplace locally", formatter_class=HELP,
                       description="A buyer, an aggregator, a ledger and the owners, each in its own process "
                                   "over RabbitMQ (or in this one over the memory bus), train on a data set "
                                   "split as DESIGN §5 says and settle on chain.")
    _job_shape(p, owners=5, validators=1, rounds=100, lr=1.5, key_bits=settings.key_bits)
    p.add_argument("--dataset", default="diabetes", help="diabetes or a CSV file (last column is the target)")
    p.add_argument("--bus", choices=["memory", "amqp"], default=settings.bus,
                   help="amqp: separate processes over RabbitMQ; memory: one process")
    p.add_argument("--amqp-url", default=settings.amqp_url, help="the RabbitMQ broker (DELTAML_AMQP_URL)")
    p.add_argument("--chain", default=settings.chain, help="embedded (an in-process EVM) or a JSON-RPC URL")
    p.add_argument("--poison-owner", type=int, default=None, metavar="I",
                   help="shuffle trainer I's targets, to see an owner that hurts the model earn no variable share")
    p.add_argument("--report", type=Path, default=None, help="write the JSON report (DESIGN §5) here")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("aggregator", help="run the aggregator daemon", formatter_class=HELP)
    p.add_argument("--name", default="aggregator", help="the party's name on the bus (its queue)")
    _workers_option(p, settings, "the models' gradient steps")
    _common(p, settings)
    _key(p, settings)
    _state(p)
    p.set_defaults(func=cmd_aggregator)

    p = sub.add_parser("ledger", help="run the ledger daemon, the only chain client", formatter_class=HELP)
    p.add_argument("--chain", default=settings.chain, help="embedded (an in-process EVM) or a JSON-RPC URL")
    p.add_argument("--contract", default=None, help="use this deployed escrow instead of deploying one")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="checkpoint who is who and each job's parties here (SQLite) and resume from it, on the "
                        "same escrow, after a crash (with --chain URL: the embedded chain ends with the process)")
    _common(p, settings)
    p.add_argument("--key", type=Path, default=None,
                   help="the key the ledger signs its messages with (parties take its word from that address "
                        "alone), created with mode 0600 if missing; with --state-dir, by default the directory's "
                        "ledger.key; else one for this run")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("owner", help="run a data owner daemon", formatter_class=HELP)
    p.add_argument("--data", type=Path, required=True, help="the owner's CSV (header row; last column the target)")
    p.add_argument("--name", default=None, help="defaults to the data file's name")
    p.add_argument("--auto-accept", action="store_true", help="join every job the data matches")
    _common(p, settings)
    _key(p, settings)
    _state(p)
    p.set_defaults(func=cmd_owner)

    buyer = sub.add_parser("buyer", help="buy a model").add_subparsers(dest="action", required=True)
    p = buyer.add_parser("train", help="request a model, follow it, write the report", formatter_class=HELP,
                         description="Make a key pair, deposit the escrow, have the model trained by the "
                                     "owners whose data has these columns, and print what each was paid.")
    p.add_argument("--features", required=True, help="comma-separated feature columns the owners' data must have")
    p.add_argument("--target", required=True, help="the column to predict")
    _job_shape(p, owners=None, validators=None, rounds=None, lr=None, key_bits=settings.key_bits)
    p.add_argument("--name", default="buyer", help="the party's name on the bus (its queue)")
    p.add_argument("--aggregator", default="aggregator", help="the name the aggregator daemon runs under")
    _workers_option(p, settings, "the refreshes and masked products of several models")
    p.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--model-out", type=Path, default=None,
                   help="write the final model here (JSON: features, target, intercept, coefficients)")
    p.add_argument("--fixed-reward-wei", type=int, default=10**16, help="paid to every owner that did its work")
    p.add_argument("--variable-pool-wei", type=int, default=10**18,
                   help="shared among trainers by contribution, scaled by the improvement; the rest is refunded")
    p.add_argument("--deadline-hours", type=int, default=DEFAULT_DEADLINE // 3600,
                   help="after this the escrow can be settled or refunded without the buyer")
    _common(p, settings)
    _key(p, settings)
    p.set_defaults(func=cmd_buyer_train)

    p = buyer.add_parser("withdraw", formatter_class=HELP,
                         help="take back what the escrow credits this key (a refund left behind)")
    p.add_argument("--key", type=Path, required=True, help="the buyer's Ethereum key file")
    p.add_argument("--name", default="buyer", help="the party's name on the bus (not while a buyer of that "
                                                   "name is running)")
    p.add_argument("--settle", metavar="JOB", default=None,
                   help="first settle this job (anyone may once it is given up or past its deadline)")
    p.add_argument("--owners", type=int, default=None, help="with --settle: the owners the job enrolled")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the ledger's receipts")
    _fees(p, settings)
    _common(p, settings, daemon=False)
    p.set_defaults(func=cmd_buyer_withdraw)

    data = sub.add_parser("dataset", help="data tools").add_subparsers(dest="action", required=True)
    p = data.add_parser("split", help="the DESIGN §5 split as one CSV per owner")
    p.add_argument("source", help="diabetes or a CSV file")
    p.add_argument("--parts", type=int, required=True, help="how many owners")
    p.add_argument("--out", type=Path, required=True, help="directory for owner-1.csv, owner-2.csv, ...")
    p.set_defaults(func=cmd_dataset_split)

    p = sub.add_parser("replay", help="replay a trace into a fresh core and compare outputs")
    p.add_argument("file", type=Path, help="a trace written with --trace")
    p.set_defaults(func=cmd_replay)
    return parser


def one_line(exc: Exception) -> str:
    """What went wrong, in the user's words: a file the system refused is named first, with its
    reason ("out: File exists"), not as ``[Errno 17] File exists: 'out'``."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltaml`` command."""
    try:
        parser = build_parser()
    except ConfigError as exc:  # a DELTAML_* variable the settings cannot take
        print(f"deltaml: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ConfigError, DataError, KeyTooShort, ProtocolError, RuntimeError,
            OSError) as exc:  # OSError: a file, or the broker (agents.amqp.BrokerUnavailable is a ConnectionError)
        print(f"deltaml: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
