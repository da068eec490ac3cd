import json

import pytest

from deltaml.protocol import messages as m
from deltaml.protocol.errors import DecodeError


def envelope(**payload_fields):
    payload = m.GradientReply(rows=3, gradients={"all": [2**4000 + 1, 5]}, **payload_fields)
    return m.Envelope(message_id="x", job_id="j", round=1, sender="owner-1", recipient="aggregator", payload=payload)


def test_round_trip():
    env = envelope()
    assert m.decode(m.encode(env)) == env


def test_envelope_is_frozen():
    env = envelope()
    with pytest.raises(Exception):
        env.round = 2


def mutate(**changes):
    raw = json.loads(m.encode(envelope()))
    for path, value in changes.items():
        target = raw
        *parents, leaf = path.split("__")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return json.dumps(raw)


@pytest.mark.parametrize("data, reason", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (mutate(schema_version=2), "unsupported schema version 2"),
    (mutate(schema_version="1"), "schema_version"),
    (mutate(payload__type="steal_key"), "payload"),
    (mutate(payload__rows="many"), "payload.gradient_reply.rows"),
    (mutate(payload__gradients={"all": ["zz"]}), "hex"),
    (mutate(round=-1), "round"),
    (mutate(round=True), "round"),  # found by the fuzzer: coerced to 1 under the same signature
    (mutate(round="0001"), "round"),
    (mutate(sender=""), "sender"),  # found by the fuzzer: an empty name was bound like any other
    (mutate(message_id=""), "message_id"),
    (mutate(recipient="x" * 200), "recipient"),
    (mutate(sender="#"), "sender"),  # a routing-key wildcard: its queue would bind to everyone's messages
    (mutate(recipient="owner.1"), "recipient"),  # two words of a routing key
    (mutate(sender="owner 1"), "sender"),
    (mutate(sender="0x" + "aB" * 20), "sender.*may not be an Ethereum address"),  # it would hear another's events
    (mutate(extra_field=1), "extra_field"),
])
def test_bad_messages_are_refused_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        m.decode(data)


def test_older_versions_are_upgraded_at_the_boundary(monkeypatch):
    raw = json.loads(m.encode(envelope()))
    raw["schema_version"] = 0
    raw["payload"]["row_count"] = raw["payload"].pop("rows")

    def upgrade(old):
        old["payload"]["rows"] = old["payload"].pop("row_count")
        return old

    monkeypatch.setitem(m.UPGRADES, 0, upgrade)
    assert m.decode(json.dumps(raw)).payload.rows == 3


def job_offer(spec: dict) -> str:
    raw = {"message_id": "x", "job_id": "j", "round": 0, "sender": "b", "recipient": "aggregator",
           "schema_version": m.SCHEMA_VERSION, "payload": {"type": "job_offer", "spec": spec}}
    return json.dumps(raw)


SPEC = {"buyer": "b", "features": ["a"], "target": "t", "owners": 2, "validators": 1, "rounds": 1,
        "lr": 1.0, "eval_every": 1, "key_bits": 2048, "public_key": format((1 << 2047) + 1, "x")}


@pytest.mark.parametrize("changes, reason", [
    ({}, None),
    ({"lr": float("inf")}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"validators": 2}, "need at least one trainer: 2 owners, 2 validators"),
    ({"rounds": 0}, "rounds"),
    ({"features": ["a", ""]}, "names must not be empty"),
    ({"features": ["a", "a"]}, "distinct columns, got a, a, t"),
    ({"features": ["a", "t"]}, "distinct columns, got a, t, t"),
])
def test_a_job_that_cannot_be_trained_is_refused_where_it_arrives(changes, reason):
    data = job_offer({**SPEC, **changes})
    if reason is None:
        assert m.decode(data).payload.spec.lr == 1.0
        return
    with pytest.raises(DecodeError, match=f"payload.job_offer.spec.*{reason}"):
        m.decode(data)


@pytest.mark.parametrize("bits, key, reason", [
    (1024, (1 << 1023) + 1, "at least 2048 bits, got 1024"),
    (2048, (1 << 2046) + 1, "2047 bits, key_bits says 2048"),
    (2048, "not hex", "modulus in hex"),
])
def test_a_job_under_a_short_or_mislabelled_key_is_refused_where_it_arrives(bits, key, reason):
    spec = {**SPEC, "key_bits": bits, "public_key": key if isinstance(key, str) else format(key, "x")}
    with pytest.raises(DecodeError, match=f"payload.job_offer.spec.*{reason}"):
        m.decode(job_offer(spec))


@pytest.mark.parametrize("field, value", [("validator", "#"), ("validator", "0x" + "1" * 40), ("message_id", "x" * 200),
                                          ("correlation_id", "x" * 200), ("recipient", "a.b")])
def test_a_forwarded_validator_part_is_held_to_the_limits_of_the_reply_it_came_from(field, value):
    """The buyer rebuilds the validator's reply from the part to check its signature: a part out of
    the envelope's limits was a validation error inside its step (retried, then dead-lettered as a
    fault of ours) instead of a message refused at decode."""
    part = {"validator": "owner-3", "rows": 10, "sse": {"all": "0a"}, "recipient": "aggregator"}
    raw = {"message_id": "m", "job_id": "j", "round": 2, "sender": "aggregator", "recipient": "buyer",
           "schema_version": m.SCHEMA_VERSION, "payload": {"type": "metric_request", "sse_scale_bits": 96, "totals": {"all": "0a"}, "parts": [part]}}
    assert m.decode(json.dumps(raw)).payload.parts[0].reply("j", 2, 96).sender == "owner-3"
    part[field] = value
    with pytest.raises(DecodeError, match=field):
        m.decode(json.dumps(raw))
