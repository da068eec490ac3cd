"""Replay a trace into a fresh pure core and report every output that differs."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from ..protocol import messages as m
from ..protocol.errors import ProtocolError
from . import parties


def _core(header: dict, path: Path):
    base = path.parent
    try:
        seed = bytes.fromhex(header["seed"])
    except ValueError:
        raise TraceError(f"{path}: the header's seed is not hex") from None
    role, name = header["role"], header["name"]
    if role == "owner":
        return parties.owner_core(name, str(base / header["data"]), header.get("auto_accept", True), seed)
    if role == "aggregator":
        return parties.aggregator_core(name, seed)
    if role == "buyer":
        return parties.buyer_core(name, parties.load_key(base / header["key"]), seed)
    raise TraceError(f"{path}: cannot replay role {role} (owner, aggregator and buyer have pure cores)")


class TraceError(ValueError):
    """A file that is not a trace as :class:`~deltaml.agents.agent.Trace` writes it, with the line."""


def _segments(path: Path) -> list[tuple[dict, list[dict]]]:
    segments: list[tuple[dict, list[dict]]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}: line {number}: not JSON ({exc.msg}); a trace is one JSON object "
                             f"per line") from None
        if not isinstance(record, dict):
            raise TraceError(f"{path}: line {number}: not a JSON object")
        if "trace" in record:
            segments.append((record, []))
        elif not segments:
            raise TraceError(f"{path}: line {number}: record before the trace header")
        else:
            segments[-1][1].append(record)
    if not segments:
        raise TraceError(f"{path}: no trace header: nothing to replay")
    return segments


def replay(path: str | Path) -> tuple[int, list[str]]:
    """Feed a trace's inputs to fresh cores; return (inputs replayed, differences).
    A file that is not a well-formed trace raises :class:`TraceError`."""
    path = Path(path)
    try:
        return _replay(path)
    except (KeyError, TypeError, ValidationError) as exc:  # a record without what Trace writes
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise TraceError(f"{path}: a malformed record ({what})") from None


#: A buyer's steps of its own (``Agent.act``), by the trace's direction: taken again from their first output.
DECISIONS = {
    "open": lambda core, env: core.open_job(env.job_id, env.payload.spec, env.recipient),
    "give_up": lambda core, env: core.give_up(env.job_id, env.payload.reason),
    "ask": lambda core, env: core.ask(env.job_id),
}


def _replay(path: Path) -> tuple[int, list[str]]:
    replayed, diffs = 0, []
    for header, records in _segments(path):
        core = _core(header, path)
        i = 0
        while i < len(records):
            record = records[i]
            i += 1
            expected = []
            while i < len(records) and records[i]["dir"] == "out":
                expected.append(m.Envelope.model_validate(records[i]["message"]))
                i += 1
            replayed += 1
            if record["dir"] == "tick":  # time passed: the core's deadlines
                got = core.tick(record["seconds"])
                if not _same(got, expected):
                    diffs.append(f"tick of {record['seconds']} s: {len(got)} outputs differ from the "
                                 f"{len(expected)} recorded")
                continue
            env = m.Envelope.model_validate(record["message"])
            where = f"{env.type} {env.message_id} (round {env.round})"
            if record["dir"] in DECISIONS:  # the buyer's own decisions, each recorded with its first output
                got = DECISIONS[record["dir"]](core, env)
                expected = [env, *expected]
            elif record["dir"] == "fault":  # its handler failed for good: what the party said instead
                got = core.fault(env)
            elif record["dir"] == "refused":
                try:
                    core.handle(env)
                except ProtocolError:
                    continue
                diffs.append(f"{where}: was refused, now accepted")
                continue
            else:
                try:
                    got = core.handle(env)
                except ProtocolError as exc:
                    diffs.append(f"{where}: now refused: {exc}")
                    continue
            if not _same(got, expected):
                diffs.append(f"{where}: {len(got)} outputs differ from the {len(expected)} recorded")
    return replayed, diffs


def _same(got: list[m.Envelope], expected: list[m.Envelope]) -> bool:
    """The same outputs, byte for byte on the wire."""
    return [m.encode(e) for e in got] == [m.encode(e) for e in expected]
