"""The escrow contract seen from pure code: call encoding, signing, proofs, the payment formula.

Theory of operation: parties never talk to a chain. A party's :class:`Wallet`
turns a contract call into a signed transaction (eth-account, deterministic
signatures) and wraps it in a ``TxRequest`` for the ledger agent, the only
chain client. Before its first transaction a wallet greets the ledger
(``ChainHello``) and learns the chain id, the contract address and its nonce
(``ChainInfo``); calls made before that wait in order. Every receipt carries
the sender's next nonce, so a wallet never drifts from the chain.

The contract's job key is ``keccak256(job_id)``; model index 0 is the model
trained by everyone and ``i + 1`` the model without the ``i``-th trainer.
:func:`mse_micro` and :func:`expected_settlement` are the contract's
integer arithmetic, so anyone can predict a settlement to the wei.
"""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping, Sequence, get_args

import eth_abi
import rlp
from eth_account import Account
from eth_utils import keccak, to_checksum_address

from . import messages as m
from .errors import JobOver, ProtocolError
from .paillier import Decryption, PublicKey, verify_decryption
from .settlement import Settlement, settle

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
#: Seconds a job may run before anyone can settle or refund it without the buyer.
DEFAULT_DEADLINE = 24 * 3600


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


def model_index(model: str, trainers: Sequence[str]) -> int:
    """0 for the full model, ``i + 1`` for the model without ``trainers[i]``."""
    from .machine import FULL_MODEL, without
    if model == FULL_MODEL:
        return 0
    for i, t in enumerate(trainers):
        if model == without(t):
            return i + 1
    raise ProtocolError(f"unknown model {model}")


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
    """The fields of a signed legacy (EIP-155) transaction, and its signer."""

    sender: str
    nonce: int
    to: str
    value: int
    data: bytes
    gas: int


def parse_tx(raw: bytes) -> RawTx:
    """Decode and authenticate a signed transaction; :class:`ProtocolError` if it is not one."""
    try:
        fields = rlp.decode(raw)
        nonce, _gas_price, gas, to, value, data = fields[:6]
        sender = Account.recover_transaction(raw)
    except Exception as exc:
        raise ProtocolError(f"not a signed legacy transaction: {exc}") from None
    as_int = lambda b: int.from_bytes(b, "big")  # noqa: E731
    return RawTx(sender=sender, nonce=as_int(nonce), to=to_checksum_address(to) if to else "",
                 value=as_int(value), data=bytes(data), gas=as_int(gas))


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


def check_metric_proofs(function: str, args: tuple, proof: m.MetricProof | list[m.MetricProof] | None,
                        job_key_hash: bytes) -> None:
    """A recordMetric call is relayed only with a valid Paillier decryption proof, and a
    recordMetrics call only with one for each of its metrics, in order."""
    if function == "recordMetric":
        check_metric_proof(args, proof, job_key_hash)
        return
    if not isinstance(proof, list) or len(proof) != len(args[1]):
        raise ProtocolError("a batch of metrics needs one decryption proof per metric")
    for metric, one in zip(args[1], proof):
        check_metric_proof((args[0], metric), one, job_key_hash)


def check_metric_proof(args: tuple, proof: m.MetricProof | None, job_key_hash: bytes) -> None:
    """A recordMetric call is relayed only with a valid Paillier decryption proof."""
    if not isinstance(proof, m.MetricProof):
        raise ProtocolError("a metric needs its decryption proof")
    _, (round_, model, ciphertext_hash, sse, scale_bits, rows, randomness) = args
    pub = PublicKey.from_hex(proof.public_key)
    if key_hash(pub) != job_key_hash:
        raise ProtocolError("the proof's key is not the job's key")
    if keccak(int_bytes(proof.ciphertext)) != ciphertext_hash:
        raise ProtocolError("the metric's ciphertext hash does not match the ciphertext")
    plain = Decryption(int.from_bytes(sse, "big"), int.from_bytes(randomness, "big"))
    if not verify_decryption(pub, proof.ciphertext, plain):
        raise ProtocolError("the decryption proof does not verify: the published metric is wrong")


def metric_args(job_id: str, round_: int, model: int, ciphertext: int, sse: int, scale_bits: int, rows: int,
                randomness: int) -> list:
    """Arguments of ``recordMetric`` for one published metric."""
    return [job_key(job_id), (round_, model, keccak(int_bytes(ciphertext)), int_bytes(sse), scale_bits, rows,
                              int_bytes(randomness))]


KEPT_BITS = 64


def mse_micro(sse: int, scale_bits: int, rows: int) -> int:
    """The contract's ``mseMicro``: the SSE cut to 64 fractional bits, times 10**6, over rows, floored."""
    t = sse >> (scale_bits - KEPT_BITS) if scale_bits >= KEPT_BITS else sse << (KEPT_BITS - scale_bits)
    return (t * 1_000_000 // rows) >> KEPT_BITS


def expected_settlement(*, fixed_reward: int, variable_pool: int, trainers: Sequence[str],
                        validators: Sequence[str], mse0: int, final: Mapping[int, int],
                        dropped: Sequence[str] = ()) -> Settlement:
    """What the contract pays for a complete job, from its recorded micro-MSEs (index → value).

    ``trainers`` is the roster as enrolled on chain; a trainer in ``dropped`` has no
    final metric and is paid nothing.
    """
    contributions = {t: final[i + 1] - final[0] for i, t in enumerate(trainers) if t not in dropped}
    return settle(fixed_reward=fixed_reward, variable_pool=variable_pool, participants=[*trainers, *validators],
                  contributions_micro=contributions, mse0_micro=mse0, mse_final_micro=final[0], dropped=dropped)


@dataclass
class Wallet:
    """A party's Ethereum key and the transactions it has signed."""

    private_key: bytes
    chain_id: int | None = None
    contract: str | None = None
    gas_price: int = 0
    nonce: int = 0
    greeted: bool = False
    hello_id: str | None = None
    sent: dict[str, str] = field(default_factory=dict)  # request message id → function, until its receipt
    queue: list[tuple[str, int, str, list, int, m.MetricProof | None]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return Account.from_key(self.private_key).address

    def snapshot(self) -> dict:
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "private_key"})

    def restore(self, state: dict) -> None:
        self.__dict__.update(state)

    def hello(self, ctx) -> m.Envelope:
        """Greet the ledger: it answers with the chain's id, the contract and this address's nonce."""
        self.greeted = True
        env = ctx.message("", 0, LEDGER, m.ChainHello(address=self.address))
        self.hello_id = env.message_id
        return env

    def greet(self, ctx) -> list[m.Envelope]:
        """A greeting unless one was sent: the ledger must know this party before events concern it."""
        return [] if self.greeted else [self.hello(ctx)]

    def call(self, ctx, job_id: str, round_: int, function: str, args: list, value: int = 0,
             proof: m.MetricProof | list[m.MetricProof] | None = None,
             participants: int | None = None) -> list[m.Envelope]:
        """A signed call for the ledger to relay, or a greeting first if the chain is not known yet
        (``participants``: how many the job enrolled, for a call whose gas grows with them)."""
        gas_limit(function, args, participants)  # a call that cannot be priced fails here, not queued
        if self.chain_id is None:
            self.queue.append((job_id, round_, function, args, value, proof, participants))
            return [] if self.greeted else [self.hello(ctx)]
        return [self._sign(ctx, job_id, round_, function, args, value, proof, participants)]

    def _sign(self, ctx, job_id, round_, function, args, value, proof, participants=None) -> m.Envelope:
        tx = {"to": self.contract, "data": encode_call(function, args), "value": value,
              "gas": gas_limit(function, args, participants), "gasPrice": self.gas_price, "nonce": self.nonce,
              "chainId": self.chain_id}
        raw = Account.sign_transaction(tx, self.private_key).raw_transaction
        self.nonce += 1
        return self.send(ctx, job_id, round_, m.TxRequest(function=function, raw="0x" + bytes(raw).hex(),
                                                          proof=proof))

    def send(self, ctx, job_id: str, round_: int, request: m.TxRequest) -> m.Envelope:
        """A signed transaction to the ledger, its receipt awaited. One signed before may be sent
        again: the ledger answers from the chain if it was mined, else sends it; its nonce is spent,
        so it cannot take effect twice."""
        env = ctx.message(job_id, round_, LEDGER, request)
        self.sent[env.message_id] = request.function
        return env

    def on_info(self, ctx, info: m.ChainInfo) -> list[m.Envelope]:
        """Learn the chain; sign what was waiting, in order."""
        self.chain_id, self.contract, self.gas_price = info.chain_id, info.contract, info.gas_price
        self.nonce = max(self.nonce, info.nonce)
        queued, self.queue = self.queue, []
        return [self._sign(ctx, *q) for q in queued]

    def on_receipt(self, receipt: m.TxReceipt) -> None:
        """Follow the chain's count: a rejected transaction frees its nonce, a mined one confirms it."""
        if receipt.next_nonce is None:
            return
        if not receipt.mined or receipt.next_nonce > self.nonce:
            self.nonce = receipt.next_nonce


class ChainParty:
    """What every paying or paid party does with chain messages, around its own state machine."""

    wallet: Wallet | None

    def snapshot(self) -> bytes:
        """Everything the core would need to go on after a crash (not the wallet's key)."""
        return pickle.dumps({"jobs": self.jobs, "rng": self.ctx.rng.getstate(),
                             "wallet": self.wallet.snapshot() if self.wallet is not None else None,
                             "own": self.own_state()})

    def restore(self, blob: bytes) -> None:
        """Go on from a :meth:`snapshot` (taken by this party, read from its own state directory)."""
        state = pickle.loads(blob)
        self.jobs = {job_id: _with_new_fields(job) for job_id, job in state["jobs"].items()}
        self.ctx.rng.setstate(state["rng"])
        if self.wallet is not None and state["wallet"] is not None:
            self.wallet.restore(state["wallet"])
        if state.get("own") is not None:  # absent from a checkpoint of an older version
            self.restore_own(state["own"])

    def own_state(self):
        """What this kind of party keeps besides its jobs (plain data; None: nothing)."""
        return None

    def restore_own(self, own) -> None:
        """Take back what :meth:`own_state` gave."""

    def statuses(self, job_id: str | None = None) -> dict[str, dict]:
        """Each job's phase and why it stands there, if it says (a failure's reason): what an agent
        logs when it changes, so an operator sees a job's course at the info level. With ``job_id``,
        that job's alone (a message steps one job; a daemon keeps every job it ever ran)."""
        jobs = self.jobs.items() if job_id is None else [(job_id, self.jobs[job_id])] if job_id in self.jobs else []
        return {job: self.status(state) for job, state in jobs}

    @staticmethod
    def status(job) -> dict:
        reason, dropped = getattr(job, "reason", ""), list(getattr(job, "dropped", []))
        return {"phase": job.phase.name.lower(), **({"reason": reason} if reason else {}),
                **({"dropped": dropped} if dropped else {})}

    def handle(self, env: m.Envelope) -> list[m.Envelope]:
        """Apply one message: the wallet's own first (chain info, receipts), then the party's
        :meth:`_step`, whose refusal leaves the wallet as it was."""
        out = self.chain_prelude(env, self.ctx)
        return out if out is not None else self.guarded(self._step, env)

    def _step(self, env: m.Envelope) -> list[m.Envelope]:
        raise NotImplementedError

    def chain_prelude(self, env: m.Envelope, ctx) -> list[m.Envelope] | None:
        """Handle messages that belong to the wallet rather than to a job; None if not one."""
        if env.type == "chain_info":
            if env.sender != LEDGER or self.wallet is None:
                raise ProtocolError("chain info from a party that is not the ledger")
            if env.correlation_id is None or env.correlation_id != self.wallet.hello_id:
                raise ProtocolError("chain info that answers no greeting of this wallet (stale?)")
            return self.wallet.on_info(ctx, env.payload)
        if env.type == "tx_receipt":
            if env.sender != LEDGER or self.wallet is None:
                raise ProtocolError("receipt from a party that is not the ledger")
            if self.wallet.sent.pop(env.correlation_id or "", None) is None:
                raise ProtocolError("receipt for a transaction this wallet did not send (stale?)")
            self.wallet.on_receipt(env.payload)
        return None

    def guarded(self, step, env: m.Envelope) -> list[m.Envelope]:
        """Run ``step``; if it refuses the message, the wallet forgets what it signed meanwhile."""
        if self.wallet is None:
            return step(env)
        saved = self.wallet.snapshot()
        try:
            return step(env)
        except Exception:
            self.wallet.restore(saved)
            raise


def event_for(env: m.Envelope, name: str) -> dict | None:
    """The arguments of a chain event of this name, else None."""
    if env.type == "chain_event" and env.payload.event == name:
        return env.payload.args
    return None


def _with_new_fields(job):
    """A job pickled by an older version: fields added since take their defaults."""
    if is_dataclass(job):
        for f in fields(job):
            if f.name in job.__dict__:
                continue
            if f.default_factory is not MISSING:
                setattr(job, f.name, f.default_factory())
            elif f.default is not MISSING:
                setattr(job, f.name, f.default)
    return job


def same_address(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.lower() == b.lower()


class Collector(ChainParty):
    """A party that only takes its own money back (``deltaml buyer withdraw``): it may first settle
    a job the contract lets anyone settle (given up, or past its deadline), then withdraws all the
    escrow credits its key, whatever the jobs. Anything but the ledger's word is a leftover of a
    job that ended and is refused without alarm."""

    def __init__(self, ctx) -> None:
        self.ctx, self.wallet = ctx, ctx.wallet
        self.jobs: dict = {}
        self.receipts: dict[str, m.TxReceipt] = {}  # function → its receipt
        self.withdrawn_wei = 0

    def collect(self, job_id: str | None = None, owners: int | None = None) -> list[m.Envelope]:
        """The settle of ``job_id`` (enrolling ``owners``), if asked, then the withdraw."""
        out = []
        if job_id is not None:
            out += self.wallet.call(self.ctx, job_id, 0, "settle", [job_key(job_id)], participants=owners)
        return out + self.wallet.call(self.ctx, job_id or "", 0, "withdraw", [])

    def done(self, settling: bool) -> bool:
        """Every receipt is in, and a withdraw that went through has reported its amount."""
        wanted = {"settle", "withdraw"} if settling else {"withdraw"}
        withdraw = self.receipts.get("withdraw")
        return wanted <= set(self.receipts) and not (withdraw.ok and not self.withdrawn_wei)

    def handle(self, env: m.Envelope) -> list[m.Envelope]:
        out = self.chain_prelude(env, self.ctx)
        if out is not None:
            return out
        if env.sender != LEDGER or env.type not in ("tx_receipt", "chain_event"):
            raise JobOver(f"{env.type!r} from {env.sender} is left from a job that ended")
        if env.type == "tx_receipt":
            self.receipts[env.payload.function] = env.payload
        elif env.payload.event == "Withdrawn" and same_address(env.payload.args["payee"], self.wallet.address):
            self.withdrawn_wei += env.payload.args["amount"]
        return []
