"""Typed messages: one frozen envelope around a payload discriminated by ``type``.

The envelope carries what every message needs (ids, job, round, sender,
recipient, schema version, signature); the payload is one of the models
below. Ciphertexts are integers in memory and hex strings on the wire.
:func:`decode` is the only way in from bytes: it refuses unknown types,
unknown schema versions and malformed fields with a :class:`DecodeError`,
and upgrades older versions at this boundary so handlers see current models.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer,
                      ValidationError, ValidationInfo, field_validator, model_validator)

from .errors import DecodeError
from .paillier import check_key_bits
from .settlement import deposit_for

SCHEMA_VERSION = 1


def _parse_cipher(v: object) -> int:
    if isinstance(v, str):
        try:
            return int(v, 16)
        except ValueError as exc:
            raise ValueError("ciphertext must be a hex string") from exc
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise ValueError("ciphertext must be a hex string")
    return int(v)  # an int or gmpy2.mpz from an in-process sender


#: A ciphertext (or any big integer): ``int`` in memory, hex string in JSON.
Cipher = Annotated[int, BeforeValidator(_parse_cipher), PlainSerializer(lambda v: format(v, "x"), return_type=str)]
#: A signed big integer in JSON: decimal string.
BigInt = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, (str, int)) else v),
                   PlainSerializer(lambda v: str(int(v)), return_type=str)]
Vector = list[Cipher]
Models = dict[str, Vector]


def _as_value(self, memo=None):
    """Messages are values: frozen, and never changed in place by a handler, so the deep copy
    a state machine makes of its state before a step may share them (about a millisecond
    per step for an aggregator holding a round's gradients)."""
    return self


class _Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    __deepcopy__ = _as_value


#: A party's name on the bus: one word of a routing key (``to.<name>``: no ``.``, and no ``*`` or
#: ``#``, which would bind its queue to everyone's messages), 1 to 128 characters.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"

#: What an Ethereum address looks like: a recipient may be one (the ledger sends a chain event to
#: the addresses the contract names, each queue bound to its agent's), a party's name may not.
ADDRESS_SHAPE = re.compile(r"0[xX][0-9a-fA-F]{40}")


def _not_an_address(name: str) -> str:
    if ADDRESS_SHAPE.fullmatch(name):
        raise ValueError("a party's name may not be an Ethereum address: the bus routes an address to "
                         "whoever signs as it")
    return name


#: A party's name: a bus word that is not an address.
PartyName = Annotated[str, Field(pattern=NAME_PATTERN), AfterValidator(_not_an_address)]


class JobSpec(_Payload):
    """What a buyer asks for: the data it wants, the training it pays for."""

    buyer: str
    features: list[str] = Field(min_length=1)
    target: str
    ranges: list[tuple[float, float]] | None = None
    owners: int = Field(ge=2)
    validators: int = Field(ge=1)
    rounds: int = Field(ge=1, le=100_000)
    lr: float = Field(gt=0, allow_inf_nan=False)
    eval_every: int = Field(ge=1)
    key_bits: int
    public_key: str
    frac_bits: int = Field(default=32, ge=16, le=64)
    magnitude_bits: int = Field(default=60, ge=16, le=256)
    fixed_reward_wei: int = Field(default=10**16, ge=0)
    variable_pool_wei: int = Field(default=10**18, ge=0)
    escrow: bool = False
    deadline: int = Field(default=0, ge=0)
    #: Seconds the aggregator waits for the replies of a phase before it acts on the silence.
    round_timeout: float = Field(default=600.0, gt=0)
    #: Trainers that must still answer for training to go on without a silent one; 0: all of them.
    quorum: int = Field(default=0, ge=0)
    #: Train a leave-one-out model per trainer to measure contributions (needed for payment and for
    #: dropping a silent trainer); off, a job with many trainers trains the full model only.
    leave_one_out: bool = True

    @field_validator("quorum")
    @classmethod
    def _quorum_of_trainers(cls, quorum: int, info: ValidationInfo) -> int:
        owners, validators = info.data.get("owners"), info.data.get("validators")
        if owners is not None and validators is not None and quorum > owners - validators:
            raise ValueError(f"more than the job's {owners - validators} trainers")
        return quorum

    @model_validator(mode="after")
    def _trainable(self) -> "JobSpec":
        """A job some owner could train: named, distinct columns, and at least one trainer."""
        if self.validators >= self.owners:
            raise ValueError(f"need at least one trainer: {self.owners} owners, {self.validators} validators")
        columns = [*self.features, self.target]
        if not all(c.strip() for c in columns):
            raise ValueError("feature and target names must not be empty")
        if len(set(columns)) != len(columns):
            raise ValueError(f"features and target must be distinct columns, got {', '.join(columns)}")
        if self.quorum and not self.leave_one_out:
            raise ValueError("going on without a silent trainer (a quorum) needs the leave-one-out models")
        return self

    @model_validator(mode="after")
    def _key_as_announced(self) -> "JobSpec":
        """The key is a modulus in hex of the announced length, and long enough: a job under a
        short key is refused where it arrives, before any party computes with it."""
        try:
            bits = int(self.public_key, 16).bit_length()
        except ValueError:
            raise ValueError("public_key must be the key's modulus in hex") from None
        if bits != self.key_bits:
            raise ValueError(f"public_key has {bits} bits, key_bits says {self.key_bits}")
        check_key_bits(bits)  # KeyTooShort is a ValueError: pydantic reports it as this model's error
        return self

    @property
    def deposit_wei(self) -> int:
        """The escrow the buyer locks: every owner's fixed reward and the variable pool."""
        return deposit_for(self.fixed_reward_wei, self.owners, self.variable_pool_wei)

    @property
    def trainers(self) -> int:
        """How many owners train (the rest validate)."""
        return self.owners - self.validators


class JobRequest(_Payload):
    """Buyer → aggregator: start a job; the initial model is ``[0]`` at ``frac_bits``."""

    type: Literal["job_request"] = "job_request"
    spec: JobSpec
    initial_model: Vector


class JobOffer(_Payload):
    """Aggregator → every owner: a job looking for data."""

    type: Literal["job_offer"] = "job_offer"
    spec: JobSpec


class JoinRequest(_Payload):
    """Owner → aggregator: my data matches; I can take part."""

    type: Literal["join_request"] = "join_request"
    rows: int = Field(ge=1)
    address: str | None = None


class RoleAssignment(_Payload):
    """Aggregator → owner: trainer or validator, and for trainers the models it is in."""

    type: Literal["role_assignment"] = "role_assignment"
    role: Literal["trainer", "validator"]
    models: list[str]


class RoleAccepted(_Payload):
    """Owner → aggregator: statistics computed, ready to work."""

    type: Literal["role_accepted"] = "role_accepted"
    role: Literal["trainer", "validator"]
    rows: int = Field(ge=1)


class Participants(_Payload):
    """Aggregator → buyer: who trains and who validates."""

    type: Literal["participants"] = "participants"
    trainers: list[str]
    validators: list[str]
    addresses: dict[str, str] = Field(default_factory=dict)


class GradientRequest(_Payload):
    """Aggregator → trainer: ``[w]`` per model at ``scale_bits``."""

    type: Literal["gradient_request"] = "gradient_request"
    scale_bits: int
    models: Models


class GradientReply(_Payload):
    """Trainer → aggregator: ``[G_i w - b_i]`` per model and its row count."""

    type: Literal["gradient_reply"] = "gradient_reply"
    rows: int = Field(ge=1)
    gradients: Models


class RefreshRequest(_Payload):
    """Aggregator → buyer: masked models to rescale by ``2**drop_bits``."""

    type: Literal["refresh_request"] = "refresh_request"
    value_bits: int
    drop_bits: int
    models: Models


class RefreshReply(_Payload):
    """Buyer → aggregator: freshly encrypted rescaled masked models."""

    type: Literal["refresh_reply"] = "refresh_reply"
    models: Models


class EvalRequest(_Payload):
    """Aggregator → validator: evaluate these models (``round`` is the evaluation)."""

    type: Literal["eval_request"] = "eval_request"
    scale_bits: int
    models: Models


class MaskedPair(_Payload):
    """``[w + alpha]`` and ``[h + beta]`` for one model."""

    u: Vector
    v: Vector
    u_bits: int


class ProductRequest(_Payload):
    """Validator → buyer: masked inputs of the metric's products."""

    type: Literal["product_request"] = "product_request"
    models: dict[str, MaskedPair]


class ProductProof(_Payload):
    """The buyer's proof for one product (:class:`deltaml.protocol.metric.MulProof`)."""

    a: Cipher
    b: Cipher
    z: Cipher
    w1: Cipher
    w2: Cipher


class ProductReply(_Payload):
    """Buyer → validator: ``C_j = [v_j]**u_j`` per model, each with its proof."""

    type: Literal["product_reply"] = "product_reply"
    models: Models
    proofs: dict[str, list[ProductProof]]


class EvalReply(_Payload):
    """Validator → aggregator: ``[SSE_v]`` per model."""

    type: Literal["eval_reply"] = "eval_reply"
    rows: int = Field(ge=1)
    sse_scale_bits: int
    sse: dict[str, Cipher]


class ValidatorPart(_Payload):
    """One validator's ``[SSE_v]`` with what its signed reply carried around it, forwarded so
    the buyer can check that a total is the sum of what the validators signed (DESIGN §2):
    otherwise the aggregator could put any ciphertext in a part and have the buyer publish
    its plaintext."""

    # the fields of the reply it came from, held to the envelope's own limits at decode (rebuilt
    # from them, a reply out of those limits was a validation error inside the buyer's step)
    validator: PartyName
    rows: int = Field(ge=1)
    sse: dict[str, Cipher]
    message_id: str = Field(default="", max_length=128)
    correlation_id: str | None = Field(default=None, max_length=128)
    recipient: str = Field(default="", pattern=f"^$|{NAME_PATTERN}")
    signature: str | None = None

    @classmethod
    def of(cls, reply: "Envelope") -> "ValidatorPart":
        """The part of a validator's (signed) evaluation reply."""
        p: EvalReply = reply.payload
        return cls(validator=reply.sender, rows=p.rows, sse=p.sse, message_id=reply.message_id,
                   correlation_id=reply.correlation_id, recipient=reply.recipient, signature=reply.signature)

    def reply(self, job_id: str, round_: int, sse_scale_bits: int) -> "Envelope":
        """The evaluation reply this part says it was taken from, for checking its signature."""
        return Envelope(message_id=self.message_id or "-", correlation_id=self.correlation_id, job_id=job_id,
                        round=round_, sender=self.validator, recipient=self.recipient or "none",
                        signature=self.signature,
                        payload=EvalReply(rows=self.rows, sse_scale_bits=sse_scale_bits, sse=self.sse))


class MetricRequest(_Payload):
    """Aggregator → buyer: decrypt these totals, verifiably."""

    type: Literal["metric_request"] = "metric_request"
    sse_scale_bits: int
    totals: dict[str, Cipher]
    parts: list[ValidatorPart]


class PublishedMetric(_Payload):
    """A decrypted SSE with its Paillier randomness, and the MSE it gives."""

    sse: BigInt
    randomness: Cipher
    rows: int
    mse: float


class MetricReply(_Payload):
    """Buyer → aggregator: published metrics per model."""

    type: Literal["metric_reply"] = "metric_reply"
    metrics: dict[str, PublishedMetric]


class JobResult(_Payload):
    """Aggregator → buyer: the final encrypted model and the metric history."""

    type: Literal["job_result"] = "job_result"
    scale_bits: int
    model: Vector
    mse_history: list[tuple[int, float]]
    final_mse: dict[str, float]


class JobClosed(_Payload):
    """Buyer → aggregator: the buyer has the model; the job is settled."""

    type: Literal["job_closed"] = "job_closed"
    payments_wei: dict[str, int]
    refund_wei: int


class JobFinished(_Payload):
    """Aggregator → owners: the job is over (``ok`` false when it failed)."""

    type: Literal["job_finished"] = "job_finished"
    ok: bool
    reason: str = ""


class TrainerDropped(_Payload):
    """Aggregator → buyer: a trainer stopped answering and the job goes on without it."""

    type: Literal["trainer_dropped"] = "trainer_dropped"
    trainer: str
    reason: str


class JobQuery(_Payload):
    """Buyer or participant → aggregator: is my job still going on? (The buyer asks when the
    aggregator's daemon is back after a stop, an owner after a silence of ``round_timeout``: one
    restarted without its state answers that it lost the job; to an owner, one over says so.)"""

    type: Literal["job_query"] = "job_query"


class Failure(_Payload):
    """Any party → aggregator: I could not do my part, and why."""

    type: Literal["failure"] = "failure"
    reason: str


class Progress(_Payload):
    """Aggregator → anyone watching: a published metric or a phase change."""

    type: Literal["progress"] = "progress"
    phase: str
    mse: float | None = None


class ChainHello(_Payload):
    """Any party → ledger: this is my address; tell me the chain and my nonce."""

    type: Literal["chain_hello"] = "chain_hello"
    address: str


class ChainInfo(_Payload):
    """Ledger → a party: what it needs to sign transactions."""

    type: Literal["chain_info"] = "chain_info"
    chain_id: int
    contract: str
    nonce: int
    gas_price: int  # the most to pay per gas: a fee cap where ``tip`` is given, else a legacy price
    tip: int | None = Field(default=None, ge=0)  # for the block's producer above the base fee (EIP-1559)


#: The escrow's ``enum State``, in order (the ABI carries an enum as a bare uint8; a test reads the
#: names from the Solidity source).
JobState = Literal["None", "Open", "Staffed", "Training", "Settled", "Cancelled"]


class EscrowQuery(_Payload):
    """Aggregator → ledger: where does the escrow of the envelope's job stand? (Asked for a job the
    aggregator lost, before it signs anything: a transaction the contract refuses would still
    take a nonce, and what the aggregator signed after it would then fail too.)"""

    type: Literal["escrow_query"] = "escrow_query"


class EscrowStanding(_Payload):
    """Ledger → the asker: the escrow's state as the contract reads now (``None`` for a job never
    created), the aggregator it names, whether it was given up, and how many it enrolled."""

    type: Literal["escrow_standing"] = "escrow_standing"
    state: JobState
    aggregator: str
    abandoned: bool
    enrolled: int = Field(ge=0)


class MetricProof(_Payload):
    """The ciphertext a metric decrypts and the key it is under, for the ledger to check the proof."""

    ciphertext: Cipher
    public_key: str


class TxRequest(_Payload):
    """A party → ledger: relay this transaction, which I signed."""

    type: Literal["tx_request"] = "tx_request"
    function: str
    raw: str = Field(pattern=r"^0x[0-9a-f]+$")
    #: recordMetric: its metric's decryption proof; recordMetrics: one per metric, in order
    proof: MetricProof | list[MetricProof] | None = None


class TxReceipt(_Payload):
    """Ledger → the signer: what became of its transaction."""

    type: Literal["tx_receipt"] = "tx_receipt"
    function: str
    tx_hash: str | None = None
    mined: bool
    ok: bool
    gas_used: int = 0
    reason: str = ""
    next_nonce: int | None = None
    #: the price to sign at now (twice the base fee and a tip: a fee cap), which the wallet follows
    gas_price: int | None = Field(default=None, ge=0)
    tip: int | None = Field(default=None, ge=0)  # as in ChainInfo
    #: not mined and never will be at its price (below the chain's base fee, or dropped by the node):
    #: its nonce is still the signer's, and the same call signed again at ``gas_price`` replaces it
    sign_again: bool = False


class ChainEvent(_Payload):
    """Ledger → every party of a job (and the progress exchange): an event the contract emitted."""

    type: Literal["chain_event"] = "chain_event"
    event: str
    args: dict[str, Any]
    tx_hash: str
    block: int


Payload = Annotated[
    Union[
        JobRequest, JobOffer, JoinRequest, RoleAssignment, RoleAccepted, Participants,
        GradientRequest, GradientReply, RefreshRequest, RefreshReply, EvalRequest,
        ProductRequest, ProductReply, EvalReply, MetricRequest, MetricReply,
        JobResult, JobClosed, JobFinished, TrainerDropped, JobQuery, Failure, Progress,
        ChainHello, ChainInfo, EscrowQuery, EscrowStanding, TxRequest, TxReceipt, ChainEvent,
    ],
    Field(discriminator="type"),
]


class Envelope(BaseModel):
    """Every message on the wire: metadata around one typed payload."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    __deepcopy__ = _as_value

    message_id: str = Field(min_length=1, max_length=128)
    correlation_id: str | None = Field(default=None, max_length=128)
    job_id: str = Field(max_length=128)  # empty for what concerns no job (a ledger greeting)
    round: int = Field(default=0, ge=0, strict=True)  # not true, not "0001": one spelling per signed value
    sender: PartyName
    recipient: str = Field(pattern=NAME_PATTERN)  # a party's name, or an address (a chain event)
    schema_version: int = Field(default=SCHEMA_VERSION, strict=True)
    signature: str | None = None
    payload: Payload

    @property
    def type(self) -> str:
        """The payload's type tag."""
        return self.payload.type


#: Upgraders from an older schema version to the next, on raw dicts.
UPGRADES: dict[int, Callable[[dict], dict]] = {}


def encode(envelope: Envelope) -> bytes:
    """Wire form: compact JSON."""
    return envelope.model_dump_json().encode()


def decode(data: bytes | str) -> Envelope:
    """Parse, upgrade and validate one message; any problem is a :class:`DecodeError`."""
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DecodeError("message is not a JSON object")
    version = raw.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise DecodeError("missing or non-integer schema_version")
    if version > SCHEMA_VERSION or (version < SCHEMA_VERSION and version not in UPGRADES):
        raise DecodeError(f"unsupported schema version {version} (this node speaks {SCHEMA_VERSION})")
    while version < SCHEMA_VERSION:
        raw = UPGRADES[version](raw)
        version += 1
        raw["schema_version"] = version
    try:
        return Envelope.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DecodeError(f"invalid message at {where or 'top'}: {first['msg']}") from None
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # a validator's own error
        raise DecodeError(f"invalid message: {type(exc).__name__}: {str(exc)[:200]}") from None
