"""The escrow contract's interface as pure code: who relays, the gas a party signs for, job keys,
calldata and signed transactions, the contract's custom errors in words."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping, Sequence, get_args

import eth_abi
import rlp
from eth_account import Account
from eth_utils import keccak, to_checksum_address

from .. import messages as m
from ..errors import ProtocolError
from ..paillier import PublicKey

LEDGER = "ledger"
CONTRACT = "DeltaEscrow"
#: Gas limits the parties sign for; unused gas is not charged.
GAS_LIMITS = {"createJob": 400_000, "cancel": 120_000, "setParticipants": 150_000, "confirm": 150_000,
              "recordMetric": 400_000, "recordMetrics": 400_000, "settle": 300_000, "withdraw": 120_000,
              "drop": 150_000, "abandon": 100_000}
#: What the calls that loop over the participants add per participant (measured on py-evm with 3 to
#: 20 owners: 46k for setParticipants, 33k for settle; these leave a third to spare).
GAS_PER_PARTICIPANT = {"setParticipants": 60_000, "settle": 45_000}
#: Metrics in one recordMetrics transaction at most (its gas limit is per metric: 16 stay well
#: inside a 30M-gas block).
METRICS_PER_TX = 16
#: Chain events about one participant of a job, by the argument that names it: they go to that
#: participant and to the job's buyer and aggregator, who run the job, not to every owner.
ABOUT_ONE = {"Confirmed": "participant", "Credited": "payee", "Dropped": "trainer"}
#: Chain events about the models (the metrics the aggregator records): the buyer's and aggregator's.
ABOUT_THE_MODELS = frozenset({"MetricRecorded"})


@lru_cache(maxsize=None)
def artifact(name: str = CONTRACT) -> dict:
    """ABI and bytecode produced by ``make contracts`` (contracts/compile.js)."""
    return json.loads(resources.files("deltaml.artifacts").joinpath(f"{name}.json").read_text())


def job_key(job_id: str) -> bytes:
    """The contract's key for a job."""
    return keccak(text=job_id)


def key_hash(public_key: PublicKey) -> bytes:
    """The contract's commitment to the buyer's Paillier modulus."""
    return keccak(int_bytes(public_key.n))


def int_bytes(x: int) -> bytes:
    """Big-endian bytes of a non-negative integer (at least one byte)."""
    return int(x).to_bytes(max(1, (int(x).bit_length() + 7) // 8), "big")



def _abi_type(entry: Mapping[str, Any]) -> str:
    if entry["type"].startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in entry["components"]) + ")" + entry["type"][5:]
    return entry["type"]


def signature(entry: Mapping[str, Any]) -> str:
    """``name(type,...)`` of an ABI function, event or error: what selectors and topics hash."""
    return f"{entry['name']}({','.join(_abi_type(i) for i in entry['inputs'])})"


JOB_STATES = get_args(m.JobState)  # the escrow's ``enum State``, in order
#: Why a job ends for a party that sees its escrow's ``Abandoned`` event: only the job's aggregator
#: can abandon it, and only once the job cannot go on (its word may be lost with it, restarted
#: without its state), so the chain's word is enough.
ABANDONED = "the aggregator gave the job's escrow up on chain: the job cannot go on"


def error_text(entry: Mapping[str, Any], data: bytes) -> str:
    """A custom error as ``Name(arg, ...)`` from the ABI-encoded arguments after its selector
    (``Invalid(metric value)`` rather than ``Invalid``, ``WrongState(Settled)`` rather than
    ``WrongState(4)``); just the name if they do not decode."""
    if not entry["inputs"]:
        return entry["name"]
    try:
        args = eth_abi.decode([_abi_type(i) for i in entry["inputs"]], data)
    except Exception:  # whatever the node returned: the name still says which check failed
        return entry["name"]
    shown = [JOB_STATES[a] if i.get("internalType", "").endswith(".State") and a < len(JOB_STATES) else a
             for i, a in zip(entry["inputs"], args)]
    return f"{entry['name']}({', '.join(str(a) for a in shown)})"


@lru_cache(maxsize=None)
def _functions() -> dict[str, tuple[bytes, list[str]]]:
    return {e["name"]: (keccak(text=signature(e))[:4], [_abi_type(i) for i in e["inputs"]])
            for e in artifact()["abi"] if e["type"] == "function"}


def encode_call(function: str, args: Sequence[Any]) -> bytes:
    """Calldata for one contract function."""
    if function not in _functions():
        raise ValueError(f"the contract has no function {function}")
    selector, types = _functions()[function]
    return selector + eth_abi.encode(types, list(args))


def decode_call(data: bytes) -> tuple[str, tuple]:
    """The function name and arguments of calldata; :class:`ProtocolError` if unknown."""
    for name, (selector, types) in _functions().items():
        if data[:4] == selector:
            try:
                return name, tuple(eth_abi.decode(types, data[4:]))
            except Exception as exc:
                raise ProtocolError(f"calldata for {name} does not decode: {exc}") from None
    raise ProtocolError("calldata names no function of the contract")


@dataclass(frozen=True)
class RawTx:
    """The fields of a signed transaction, legacy (EIP-155) or with a fee cap (EIP-1559, type 2),
    and its signer."""

    sender: str
    nonce: int
    to: str
    value: int
    data: bytes
    gas: int
    gas_price: int = 0  # the most it pays per gas: a legacy price, or a fee cap (0 in an older ledger's state)
    tip: int = 0  # the most of that above the base fee for the block's producer (legacy: all of it)


FEE_CAP_TYPE = 2  # EIP-1559


def parse_tx(raw: bytes) -> RawTx:
    """Decode and authenticate a signed transaction; :class:`ProtocolError` if it is not one."""
    if raw[:1] and raw[0] <= 0x7F and raw[0] != FEE_CAP_TYPE:
        raise ProtocolError(f"transaction type {raw[0]} is not taken: legacy or EIP-1559 (type 2) only")
    try:
        if raw[:1] == bytes([FEE_CAP_TYPE]):
            _chain_id, nonce, tip, gas_price, gas, to, value, data = rlp.decode(raw[1:])[:8]
        else:
            nonce, gas_price, gas, to, value, data = rlp.decode(raw)[:6]
            tip = gas_price
        sender = Account.recover_transaction(raw)
    except Exception as exc:
        raise ProtocolError(f"not a signed transaction: {exc}") from None
    as_int = lambda b: int.from_bytes(b, "big")  # noqa: E731
    return RawTx(sender=sender, nonce=as_int(nonce), to=to_checksum_address(to) if to else "",
                 value=as_int(value), data=bytes(data), gas=as_int(gas), gas_price=as_int(gas_price), tip=as_int(tip))


def gas_limit(function: str, args: Sequence[Any], participants: int | None = None) -> int:
    """The gas a party signs for: a batch of metrics gets the single metric's limit per entry, and a
    call that loops over the job's participants gets more per participant (``setParticipants``
    counts its arguments; ``settle`` must be told how many are enrolled)."""
    if function == "setParticipants":
        participants = len(args[1]) + len(args[2])
    per = GAS_PER_PARTICIPANT.get(function, 0)
    if per and participants is None:
        raise ValueError(f"the gas of {function} depends on the number of participants")
    return GAS_LIMITS[function] * (len(args[1]) if function == "recordMetrics" else 1) + per * (participants or 0)


def event_audience(event: str, args: Mapping[str, Any], parties: set[str], principals: set[str]) -> set[str]:
    """The addresses (lower case) a job's chain event is sent to, besides the progress exchange,
    where anyone may watch every event. ``parties``: every address the job names so far;
    ``principals``: its buyer's and its aggregator's.

    An event about the whole job (created, staffed, started, settled, cancelled, given up) goes to
    every party; one about a single participant (:data:`ABOUT_ONE`) to it and the principals; a
    metric to the principals. An owner acts on its job's being staffed or given up and on its own
    credit, and may learn its own payment, not the others'. Sent to every party, each of N owners'
    confirmations and credits and each of the N + 1 final metrics made N + 2 messages: a paid job's
    events grew with the square of its owners (31,000 at 100 owners), and now grow with their number.
    """
    if event in ABOUT_ONE:
        return {*principals, str(args[ABOUT_ONE[event]]).lower()}
    if event in ABOUT_THE_MODELS:
        return set(principals)
    return set(parties)
