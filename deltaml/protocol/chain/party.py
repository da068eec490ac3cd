"""A party's side of the chain: its :class:`Wallet` (key, nonce, signed calls waiting for the
chain to be known), :class:`ChainParty` (what every paying or paid party does with chain
messages, and its checkpoint), and :class:`Collector`, which only takes its money back."""

from __future__ import annotations

import copy
import pickle
from dataclasses import MISSING, dataclass, field, fields, is_dataclass

from eth_account import Account

from .. import messages as m
from ..ended import EndedJobs
from ..errors import JobOver, ProtocolError
from ..fees import MAX_FEE, MAX_TIP, gwei
from .contract import LEDGER, encode_call, gas_limit, job_key


@dataclass(frozen=True)
class Signed:
    """A transaction sent to the ledger, until its receipt: what to sign again (the same call at
    the same nonce) if the chain will not mine it at its price, and that price."""

    function: str
    nonce: int | None = None  # None, and no call: sent as it was signed before (it cannot be signed again)
    call: tuple | None = None  # (job_id, round, function, args, value, proof, participants)
    price: int = 0  # its fee cap (or legacy price) and tip
    tip: int | None = None


@dataclass
class Wallet:
    """A party's Ethereum key and the transactions it has signed."""

    private_key: bytes
    chain_id: int | None = None
    contract: str | None = None
    gas_price: int = 0  # a fee cap where ``tip`` is known (EIP-1559 transactions), else a legacy price
    tip: int | None = None
    nonce: int = 0
    max_fee: int = MAX_FEE  # its party's ceilings (configuration, not state: not in a snapshot)
    max_tip: int = MAX_TIP
    escrow: str | None = None  # the only contract, and chain, it signs for, if its party says (configuration)
    escrow_chain: int | None = None
    greeted: bool = False
    hello_id: str | None = None
    sent: dict[str, Signed] = field(default_factory=dict)  # request message id → its call, until its receipt
    queue: list[tuple[str, int, str, list, int, m.MetricProof | None]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return Account.from_key(self.private_key).address

    def snapshot(self) -> dict:
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in _NOT_STATE})

    def restore(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.chain_id is not None and self.foreign(self.chain_id, self.contract):  # saved under other pins
            self.chain_id = self.contract = None
            self.greeted = False

    def foreign(self, chain_id: int, contract: str) -> str:
        """Why this wallet signs nothing for ``contract`` on chain ``chain_id`` ("" if it does):
        its party named another escrow or chain (``--escrow``, ``--chain-id``). The ledger says
        which contract to call, and a call's value (a deposit) goes there."""
        if self.escrow is not None and contract.lower() != self.escrow.lower():
            return (f"the ledger names escrow {contract}; this party signs only for {self.escrow} (--escrow): "
                    "nothing signed")
        if self.escrow_chain is not None and chain_id != self.escrow_chain:
            return (f"the ledger's chain has id {chain_id}; this party signs only for chain {self.escrow_chain} "
                    "(--chain-id): nothing signed")
        return ""

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

    def _sign(self, ctx, job_id, round_, function, args, value, proof, participants=None,
              nonce: int | None = None) -> m.Envelope:
        """Sign a call at the next nonce (or at ``nonce``, again) and the wallet's gas price."""
        if nonce is None:
            nonce, self.nonce = self.nonce, self.nonce + 1
        tx = {"to": self.contract, "data": encode_call(function, args), "value": value,
              "gas": gas_limit(function, args, participants), "nonce": nonce, "chainId": self.chain_id}
        if self.tip is None:  # a chain without a base fee
            tx["gasPrice"] = self.gas_price
        else:  # pays the base fee and the tip, at most the cap: a legacy price would give the producer it all
            tx.update(type=2, maxFeePerGas=self.gas_price, maxPriorityFeePerGas=min(self.tip, self.gas_price))
        raw = Account.sign_transaction(tx, self.private_key).raw_transaction
        request = m.TxRequest(function=function, raw="0x" + bytes(raw).hex(), proof=proof)
        return self.send(ctx, job_id, round_, request,
                         Signed(function, nonce, (job_id, round_, function, args, value, proof, participants),
                                self.gas_price, self.tip))

    def sign_again(self, ctx, signed: Signed) -> list[m.Envelope]:
        """The same call at the same nonce, at the wallet's gas price now (the chain's, learnt from
        the receipt that asked): it replaces a transaction the chain will not mine at its price."""
        return [self._sign(ctx, *signed.call, nonce=signed.nonce)]

    def send(self, ctx, job_id: str, round_: int, request: m.TxRequest, signed: Signed | None = None) -> m.Envelope:
        """A signed transaction to the ledger, its receipt awaited. One signed before may be sent
        again: the ledger answers from the chain if it was mined, else sends it; its nonce is spent,
        so it cannot take effect twice."""
        env = ctx.message(job_id, round_, LEDGER, request)
        self.sent[env.message_id] = signed or Signed(request.function)
        return env

    def on_info(self, ctx, info: m.ChainInfo) -> list[m.Envelope]:
        """Learn the chain; sign what was waiting, in order."""
        self.chain_id, self.contract = info.chain_id, info.contract
        self.follow(info.gas_price, info.tip)
        self.nonce = max(self.nonce, info.nonce)
        queued, self.queue = self.queue, []
        return [self._sign(ctx, *q) for q in queued]

    def follow(self, price: int, tip: int | None) -> None:
        """Sign at the prices the ledger advises, up to this wallet's ceilings."""
        self.gas_price = min(price, self.max_fee)
        self.tip = None if tip is None else min(tip, self.max_tip, self.gas_price)

    def beyond(self, receipt: m.TxReceipt, signed: Signed) -> str:
        """Why a transaction the chain will not mine at its price is not signed again ("" if it
        is): the price asked is above this wallet's ceiling, and the one signed was at it already
        (below it, the wallet signs again at the ceiling, which the chain may still take)."""
        asked = [(receipt.gas_price or 0, self.max_fee, signed.price, "fee cap", "max-fee")]
        if receipt.tip is not None:
            asked.append((receipt.tip, self.max_tip, signed.tip or 0, "tip", "max-tip"))
        over = [a for a in asked if a[0] > a[1]]
        if not over or any(ceiling > was for _, ceiling, was, _, _ in over):
            return ""
        price, ceiling, _, what, flag = over[0]
        return (f"not signed again: the chain asks a {what} of {gwei(price)} gwei per gas, above this "
                f"party's ceiling of {gwei(ceiling)} gwei (--{flag}-gwei)")

    def on_receipt(self, receipt: m.TxReceipt) -> None:
        """Follow the chain's price, and its count: a rejected transaction frees its nonce, a mined
        one confirms it; one to sign again keeps it."""
        if receipt.gas_price:
            self.follow(receipt.gas_price, receipt.tip)
        if receipt.next_nonce is None or receipt.sign_again:
            return
        if not receipt.mined or receipt.next_nonce > self.nonce:
            self.nonce = receipt.next_nonce


class ChainParty:
    """What every paying or paid party does with chain messages, around its own state machine."""

    wallet: Wallet | None
    ended: EndedJobs | None = None  # a daemon serving job after job keeps only the newest ended ones

    def snapshot(self) -> bytes:
        """Everything the core would need to go on after a crash (not the wallet's key)."""
        return pickle.dumps({"jobs": self.jobs, "rng": self.ctx.rng.getstate(),
                             "wallet": self.wallet.snapshot() if self.wallet is not None else None,
                             "own": self.own_state(),
                             "forgotten": self.ended.forgotten if self.ended is not None else None})

    def restore(self, blob: bytes) -> None:
        """Go on from a :meth:`snapshot` (taken by this party, read from its own state directory)."""
        state = pickle.loads(blob)
        self.jobs = {job_id: _with_new_fields(job) for job_id, job in state["jobs"].items()}
        self.ctx.rng.setstate(state["rng"])
        if self.wallet is not None and state["wallet"] is not None:
            self.wallet.restore(state["wallet"])
        if state.get("own") is not None:  # absent from a checkpoint of an older version
            self.restore_own(state["own"])
        if self.ended is not None and state.get("forgotten") is not None:
            self.ended.forgotten = state["forgotten"]

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
        out = out if out is not None else self.guarded(self._step, env)
        self.retire()
        return out

    def holds(self, job_id: str) -> bool:
        """Whether this party still holds the job (running, or ended and kept: :mod:`..ended`)."""
        return job_id in self.jobs

    def retire(self) -> None:
        """Shed what ended jobs no longer need, and forget the oldest (:mod:`..ended`)."""
        if self.ended is not None:
            self.ended.retire(self.jobs)

    def _step(self, env: m.Envelope) -> list[m.Envelope]:
        raise NotImplementedError

    def signed_again(self, job_id: str, request: m.TxRequest) -> None:
        """A transaction of ``job_id`` was signed again in place of one the chain would not mine:
        a party that keeps a signed transaction, to send it again, keeps this one instead."""

    def chain_prelude(self, env: m.Envelope, ctx) -> list[m.Envelope] | None:
        """Handle messages that belong to the wallet rather than to a job; None if not one."""
        if env.type == "chain_info":
            if env.sender != LEDGER or self.wallet is None:
                raise ProtocolError("chain info from a party that is not the ledger")
            if env.correlation_id is None or env.correlation_id != self.wallet.hello_id:
                raise ProtocolError("chain info that answers no greeting of this wallet (stale?)")
            refused = self.wallet.foreign(env.payload.chain_id, env.payload.contract)
            if refused:
                return self._unsigned(env, refused)
            return self.wallet.on_info(ctx, env.payload)
        if env.type == "tx_receipt":
            if env.sender != LEDGER or self.wallet is None:
                raise ProtocolError("receipt from a party that is not the ledger")
            signed = self.wallet.sent.pop(env.correlation_id or "", None)
            if signed is None:
                raise ProtocolError("receipt for a transaction this wallet did not send (stale?)")
            if isinstance(signed, str):  # (a wallet saved before it kept its calls)
                signed = Signed(signed)
            receipt: m.TxReceipt = env.payload
            refused = self.wallet.beyond(receipt, signed) if receipt.sign_again and signed.call is not None else ""
            if refused:  # the job hears of it as of a transaction not mined, and its nonce is free again
                receipt = receipt.model_copy(update={"sign_again": False, "reason": f"{receipt.reason}; {refused}"})
                env = env.model_copy(update={"payload": receipt})
            self.wallet.on_receipt(receipt)
            if receipt.sign_again and signed.call is not None:  # the job never hears of it
                again = self.wallet.sign_again(ctx, signed)
                self.signed_again(env.job_id, again[0].payload)
                return again
            if refused:
                return self.guarded(self._step, env)
        return None

    def _unsigned(self, info: m.Envelope, reason: str) -> list[m.Envelope]:
        """The calls that waited for the chain, none signed: each job hears of its call as of a
        transaction not mined, with ``reason``. The next call greets the ledger again."""
        queued, self.wallet.queue, self.wallet.greeted = self.wallet.queue, [], False
        out = []
        for job_id, round_, function, *_ in queued:
            receipt = m.TxReceipt(function=function, mined=False, ok=False, reason=reason)
            out += self.guarded(self._step, info.model_copy(update={"job_id": job_id, "round": round_,
                                                                    "payload": receipt}))
        return out

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


#: A wallet's fields that are not its state: its key, and its party's ceilings and pins (a restarted
#: party takes the ones it is started with, not those of its checkpoint).
_NOT_STATE = ("private_key", "max_fee", "max_tip", "escrow", "escrow_chain")


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

    def _step(self, env: m.Envelope) -> list[m.Envelope]:
        if env.sender != LEDGER or env.type not in ("tx_receipt", "chain_event"):
            raise JobOver(f"{env.type!r} from {env.sender} is left from a job that ended")
        if env.type == "tx_receipt":
            self.receipts[env.payload.function] = env.payload
        elif env.payload.event == "Withdrawn" and same_address(env.payload.args["payee"], self.wallet.address):
            self.withdrawn_wei += env.payload.args["amount"]
        return []
