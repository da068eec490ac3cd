"""The ``deltaml`` command line (DESIGN §5)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import DataError
from .protocol.errors import KeyTooShort, ProtocolError
from .protocol.paillier import check_key_bits


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a whole marketplace locally")
    p.add_argument("--owners", type=int, default=5)
    p.add_argument("--validators", type=int, default=1)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--lr", type=float, default=1.5)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--key-bits", type=int, default=2048)
    p.add_argument("--dataset", default="diabetes", help="diabetes or a CSV file (last column is the target)")
    p.add_argument("--bus", choices=["memory", "amqp"], default="memory")
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--chain", default="embedded")
    p.add_argument("--poison-owner", type=int, default=None)
    p.add_argument("--report", type=Path, default=None)


def _progress(round_: int, mse: float, elapsed: float) -> None:
    print(f"round {round_:>5}  validation MSE {mse:12.4f}  elapsed {elapsed:8.1f}s", flush=True)


def _demo(args) -> int:
    from .marketplace import DemoConfig, run_memory

    check_key_bits(args.key_bits)
    if args.bus != "memory":
        raise SystemExit("deltaml: error: --bus amqp is not available yet; use --bus memory")
    if args.chain != "embedded":
        raise SystemExit("deltaml: error: only the embedded chain is available yet")
    config = DemoConfig(owners=args.owners, validators=args.validators, rounds=args.rounds, lr=args.lr,
                        eval_every=args.eval_every, key_bits=args.key_bits, dataset=args.dataset,
                        poison_owner=args.poison_owner)
    report = run_memory(config, _progress)
    rel = abs(report["final_mse"] - report["centralized_gd_mse"]) / report["centralized_gd_mse"]
    print(f"final MSE {report['final_mse']:.4f}  centralised GD {report['centralized_gd_mse']:.4f} "
          f"(relative difference {rel:.1e})  least squares {report['closed_form_mse']:.4f}")
    print(f"{'owner':<12}{'contribution':>14}{'paid (wei)':>24}")
    for owner, paid in report["payments_wei"].items():
        c = report["contributions"].get(owner)
        print(f"{owner:<12}{'validator' if c is None else f'{c:.4f}':>14}{paid:>24}")
    print(f"refund to buyer {report['refund_wei']} wei of {report['deposit_wei']}; "
          f"wall time {report['wall_seconds']:.1f}s")
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltaml`` command."""
    parser = argparse.ArgumentParser(prog="deltaml", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    try:
        return {"demo": _demo}[args.command](args)
    except (DataError, KeyTooShort, ProtocolError, RuntimeError) as exc:
        print(f"deltaml: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
