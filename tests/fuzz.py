"""Random and mutated envelopes for the fuzz tests: hypothesis strategies and a seeded twin.

Templates are the signed messages of a recorded job (tests/traces). A mutation
keeps the envelope's shape but breaks what makes it acceptable: a changed
field under a stale signature, no signature, a forger's signature on an
honest party's name, a torn body, a bad schema version. Job requests and
offers are left out: a fresh job request is a legitimate message from anyone.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

from hypothesis import strategies as st

from deltaml.protocol import messages as m
from deltaml.protocol.auth import sign

TRACES = Path(__file__).parent / "traces"
MALLORY = bytes.fromhex("4d" * 32)


def templates() -> list[dict]:
    out = []
    for path in sorted(TRACES.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            msg = record.get("message")
            if record.get("dir") == "in" and msg and msg["payload"]["type"] not in ("job_request", "job_offer"):
                out.append(msg)
    return out


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            if prefix[-1:] == ("payload",) and k == "type":
                continue  # keep the tag: the payload stays the kind of message it was
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            yield from _paths(v, (*prefix, i))


def _set(value, path, new):
    if not path:
        return new
    target = value
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return value


JUNK = [None, True, -1, 0, 2**70, -(2**300), 1.5, "", "zz", "0" * 600, [], {}, {"type": "x"}, ["a", 1]]


def mutate(template: dict, rng: random.Random, job_id: str) -> bytes:
    """One broken envelope made from ``template``, aimed at the honest job half the time."""
    msg = copy.deepcopy(template)
    if rng.random() < 0.5:
        msg["job_id"] = job_id
    kind = rng.randrange(6)
    if kind == 0:  # a field changed under the old signature
        paths = list(_paths(msg))[1:]
        path = rng.choice(paths)
        msg = _set(msg, path, rng.choice([*JUNK, rng.getrandbits(64), format(rng.getrandbits(256), "x")]))
        return json.dumps(msg).encode()
    if kind == 1:  # the signature removed or garbled
        msg["signature"] = rng.choice([None, "", "00" * 65, format(rng.getrandbits(520), "0130x"), "xyz"])
        return json.dumps(msg).encode()
    if kind == 2:  # a forger signs as the honest sender
        try:
            env = m.Envelope.model_validate({**msg, "signature": None})
        except Exception:
            return json.dumps(msg).encode()
        return m.encode(sign(env.model_copy(update={"message_id": format(rng.getrandbits(128), "032x")}),
                             MALLORY))
    if kind == 3:  # a torn body
        body = json.dumps(msg).encode()
        return body[: rng.randrange(len(body))]
    if kind == 4:
        msg["schema_version"] = rng.choice([0, 2, 99, -1, "1", None])
        return json.dumps(msg).encode()
    body = bytearray(json.dumps(msg).encode())  # bytes flipped anywhere
    for _ in range(rng.randrange(1, 6)):
        body[rng.randrange(len(body))] = rng.randrange(256)
    return bytes(body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def bodies(job_id: str):
    """Raw bytes, arbitrary JSON, and mutated envelopes."""
    kept = templates()
    return st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.tuples(st.sampled_from(kept), st.integers(0, 2**64)).map(
            lambda t: mutate(t[0], random.Random(t[1]), job_id)),
        st.tuples(st.sampled_from(kept), st.integers(0, 2**64)).map(
            lambda t: mutate(t[0], random.Random(t[1]), job_id)),
    )
