"""The ledger agent: the only chain client. It relays what parties signed and reports what happened.

Theory of operation: a party greets the ledger with its address
(``ChainHello``) and learns the chain id, the contract and its nonce
(``ChainInfo``); on a development chain the ledger also tops its balance up
from the node's first account (the faucet). A ``TxRequest`` carries a
transaction the party signed itself; the ledger checks that the signer is
the address that party registered, that it calls our contract for the job
the envelope names, and — for a metric — that the Paillier decryption proof
verifies against the job's key committed on chain. Only then does it send
the transaction. The signer gets a ``TxReceipt`` once it is mined: at once on
a chain that mines each transaction as it comes (the embedded one, anvil's
default); on one that mines a block every few seconds the ledger goes on with
other requests and answers at its first tick after the block (a greeting
alike, once its faucet transfer is mined: the parties greeting together are
funded in one block). A transaction the chain will not mine at its gas price
(below the base fee when it comes, or when the fee rises while it waits, or
dropped by the node) is answered "sign again" with the chain's price, and one
left in the pool for ``PATIENCE`` blocks with twice its tip, up to ``MAX_TIP``
(a top-up alike, sent again by the ledger itself); the one
signed again in its place gets the first's receipt if the first is mined
after all. The progress exchange gets each event the contract emitted
(``ChainEvent``), and so do the parties it concerns
(:func:`~deltaml.protocol.chain.event_audience`): an event about the whole
job every party, one about a single participant that participant and the
job's buyer and aggregator, a metric those two. They are sent to the
addresses the contract names for the job (each agent's queue is bound to its
address as well as its name). A request delivered again (the
ledger stopped before it acknowledged it) is answered from the chain: the
receipt and events of the transaction already mined, not a second send.

A request that comes while the node does not answer (and every one after it,
in order) is kept and handled at the first tick the node answers; after
``NODE_PATIENCE`` seconds its signer is told it was given up.

A ledger restarted without its state on the same escrow (``--contract``)
goes on too: a request from a party that greeted the ledger before it is
taken from the address that signed both envelope and transaction, and a job
it never saw created has its parties read from the contract. An
``EscrowQuery`` is answered with where the job's escrow stands
(``EscrowStanding``), read from the contract. It decides nothing: the
contract does.

``embedded`` is an in-process EVM (eth-tester with py-evm); any other value
is a JSON-RPC URL (anvil, a testnet node).
"""

from __future__ import annotations

import functools
import pickle
from collections import defaultdict
from types import SimpleNamespace

import structlog
from eth_utils import is_address, to_checksum_address

from ...protocol import chain
from ...protocol import messages as m
from ...protocol.auth import signer
from ...protocol.errors import ProtocolError
from ...protocol.machine import Context, require
from ..bus import MAX_ATTEMPTS
from ..topology import PROGRESS, address_recipient
from .node import FAUCET_TOPUP, MAX_TIP, PATIENCE, TIP, Chain, ChainUnavailable, Underpriced

__all__ = ["FAUCET_TOPUP", "JOB_FUNCTIONS", "Chain", "ChainUnavailable", "LedgerCore", "saved_chain", "saved_contract"]

log = structlog.get_logger()
JOB_FUNCTIONS = {"createJob", "cancel", "setParticipants", "confirm", "drop", "recordMetric", "recordMetrics",
                 "abandon", "settle"}


#: Seconds the ledger keeps requests that came while its chain node did not answer (a node restarting,
#: an RPC provider's outage or rate limit) before it tells their signers it gave them up.
NODE_PATIENCE = 600.0


def _unanswered(exc: OSError) -> str:
    """What to say of a node that did not answer: the exception's kind, not its text, which may
    quote the node's URL, and an API key in it."""
    return f"the chain node did not answer ({type(exc).__name__})"


def _slot(tx: chain.RawTx) -> str:
    """A transaction's place in its sender's sequence: what a transaction signed again shares with
    the one it replaces."""
    return f"{tx.sender}/{tx.nonce}"


def _raised(price: int) -> int:
    """The least price that replaces one of ``price`` in any node's pool (geth's takes a
    replacement at 10 % more, fee cap and tip alike), with room to spare."""
    return price * 9 // 8 + 1


def _outbid(tip: int) -> int:
    """A tip raised for a transaction block producers passed over: twice as much, up to ``MAX_TIP``
    (and at least enough to replace it)."""
    return max(_raised(tip), min(2 * tip, MAX_TIP))


def saved_chain(chain_id: int, contract: str) -> dict:
    """Where a ledger's saved state belongs."""
    return {"chain_id": chain_id, "contract": to_checksum_address(contract)}


def _gas_totals(used) -> dict[str, int]:
    """A function's gas as the ledger keeps it (a state saved before kept every call's: a list)."""
    if isinstance(used, dict):
        return used
    return {"calls": len(used), "total": sum(used), "max": max(used, default=0)}


def saved_contract(blob: bytes) -> str:
    """The escrow a ledger's :meth:`LedgerCore.snapshot` belongs to."""
    return pickle.loads(blob)["chain"]["contract"]


class LedgerCore:
    """Registers parties, checks and relays their transactions, fans chain events out."""

    def __init__(self, ctx: Context, chain_: Chain, node_patience: float = NODE_PATIENCE) -> None:
        self.ctx = ctx
        self.chain = chain_
        self.node_patience = node_patience
        self.addresses: dict[str, str] = {}            # party name → address
        self.jobs: dict[bytes, str] = {}               # contract job key → job id
        self.parties: dict[str, set[str]] = defaultdict(set)  # job id → addresses (lower)
        self.principals: dict[str, set[str]] = {}  # job id → its buyer's and aggregator's addresses (lower)
        self.gas: dict[str, dict[str, int]] = {}  # function → calls, total and max gas
        self.withdrawn: dict[str, int] = defaultdict(int)  # address → wei withdrawn
        # sent, not mined yet: hash → the request it answers (a greeting's: its faucet transfer, no RawTx)
        self.pending: dict[str, tuple[m.Envelope, chain.RawTx | None]] = {}
        # a transaction its signer was told to sign again while the node still held it: "sender/nonce" → its
        # hash, for if the chain mines it after all (the one signed again is then answered with its receipt)
        self.replaced: dict[str, str] = {}
        # a pending transaction's (or top-up's) first tick unmined: hash → the chain's block number then
        self.since: dict[str, int] = {}
        # requests that came while the node did not answer, in order, each with the seconds it has waited
        self.kept: list[tuple[m.Envelope, float]] = []

    def snapshot(self) -> bytes:
        """Who is who and each job's parties, for ``--state-dir``: a ledger restarted on the same
        chain and contract goes on relaying for parties that greeted the one before it."""
        return pickle.dumps({"chain": saved_chain(self.chain.chain_id, self.chain.address),
                             "addresses": self.addresses, "jobs": self.jobs,
                             "parties": dict(self.parties), "principals": self.principals,
                             "gas": dict(self.gas), "withdrawn": dict(self.withdrawn),
                             "pending": self.pending, "replaced": self.replaced, "since": self.since,
                             "kept": self.kept, "rng": self.ctx.rng.getstate()})

    def restore(self, blob: bytes) -> None:
        """Go on from a :meth:`snapshot` taken on this chain and contract (and no other: the
        greetings and jobs it holds mean nothing elsewhere)."""
        state = pickle.loads(blob)
        here = saved_chain(self.chain.chain_id, self.chain.address)
        if state["chain"] != here:
            raise ChainUnavailable(f"the saved state is of escrow {state['chain']['contract']} on chain "
                                   f"{state['chain']['chain_id']}, not {here['contract']} on chain {here['chain_id']}")
        self.addresses = state["addresses"]
        self.jobs = state["jobs"]
        self.parties = defaultdict(set, state["parties"])
        self.principals = state.get("principals", {})  # (a state saved before: read from the contract when needed)
        self.gas = {fn: _gas_totals(used) for fn, used in state["gas"].items()}
        self.withdrawn = defaultdict(int, state["withdrawn"])
        self.pending = state.get("pending", {})  # (a state saved before the ledger waited for blocks: none)
        self.replaced = state.get("replaced", {})
        self.since = state.get("since", {})
        self.kept = state.get("kept", [])
        self.ctx.rng.setstate(state["rng"])

    def handle(self, env: m.Envelope) -> list[m.Envelope]:
        """Handle a request. One that comes while the node does not answer, or while earlier ones
        are kept (a sender's transactions must reach the chain in order), is kept: acknowledged,
        and handled at the first tick the node answers, in the order they came."""
        if not self.kept:
            try:
                return self._handle(env)
            except OSError as exc:
                log.warning("chain node away: request kept", type=env.type, sender=env.sender,
                            reason=_unanswered(exc))
        self.kept.append((env, 0.0))
        return []

    def _handle_kept(self) -> list[m.Envelope]:
        """The kept requests, in the order they came, until the node fails to answer again. One
        that cannot be handled now (refused, or a nonce ahead of the chain's) gets the answer of a
        request given up: it was acknowledged, and nobody will send it again."""
        out = []
        while self.kept:
            env, _ = self.kept[0]
            try:
                out += self._handle(env)
            except OSError:
                break
            except Exception as exc:
                log.warning("kept request given up", type=env.type, sender=env.sender, reason=str(exc))
                out += self.fault(env, f"the ledger could not relay it: {exc}")
            self.kept.pop(0)
        return out

    def _handle(self, env: m.Envelope) -> list[m.Envelope]:
        if env.type == "chain_hello":
            return self._hello(env)
        if env.type == "tx_request":
            return self._relay(env)
        if env.type == "escrow_query":
            return [self.ctx.reply(env, self.chain.standing(chain.job_key(env.job_id)))]
        raise ProtocolError(f"the ledger takes chain_hello, tx_request and escrow_query, not {env.type}")

    def fault(self, env: m.Envelope, reason: str = "") -> list[m.Envelope]:
        """A transaction the ledger could not relay, its retries spent (an earlier transaction of
        the sender had not reached the chain) or kept for ``node_patience`` seconds without the
        node answering: the signer is told it was not mined, rather than waiting for a receipt that
        will not come (STYLE §4), with the chain's count of its transactions if the node answers by
        then (its wallet follows it). The reason stays generic: the error may quote the node's URL,
        which can carry an API key."""
        if env.type != "tx_request":
            return []
        try:  # the chain's count if the node answers now; else the wallet keeps its own
            next_nonce = self.chain.nonce(chain.parse_tx(bytes.fromhex(env.payload.raw[2:])).sender)
        except Exception:
            next_nonce = None
        payload = m.TxReceipt(function=env.payload.function, tx_hash=None, mined=False, ok=False, gas_used=0,
                              reason=reason or f"the ledger gave it up after {MAX_ATTEMPTS} attempts: an earlier "
                                               "transaction of the sender had not reached the chain, or the ledger "
                                               "failed (its log says which)",
                              next_nonce=next_nonce)
        return [self.ctx.reply(env, payload)]

    def _hello(self, env: m.Envelope) -> list[m.Envelope]:
        address = env.payload.address
        require(is_address(address), f"{address!r} is not an Ethereum address")
        known = self.addresses.get(env.sender)
        require(known is None or known.lower() == address.lower(),
                f"{env.sender} is already registered with another address")
        self.addresses[env.sender] = to_checksum_address(address)
        for tx_hash, (waiting, tx) in self.pending.items():
            if tx is None and waiting.payload.address.lower() == address.lower():  # greeted again, unfunded
                self.pending[tx_hash] = (env, None)  # its latest greeting is answered, once
                return []
        funding = self.chain.fund(address)
        if funding is not None:  # a chain that mines blocks: answered once the party can pay its gas
            self.pending[funding] = (env, None)
            log.info("funding sent", party=env.sender, tx_hash=funding)
            return []
        return self._info(env)

    def _info(self, env: m.Envelope) -> list[m.Envelope]:
        """A greeting's answer: the chain, the contract and the party's nonce."""
        price, tip = self.chain.prices()
        info = m.ChainInfo(chain_id=self.chain.chain_id, contract=self.chain.address,
                           nonce=self.chain.nonce(env.payload.address), gas_price=price, tip=tip)
        return [self.ctx.reply(env, info)]

    def _relay(self, env: m.Envelope) -> list[m.Envelope]:
        req: m.TxRequest = env.payload
        raw = bytes.fromhex(req.raw[2:])
        tx = chain.parse_tx(raw)
        # a party that greeted the ledger before this one (restarted without its state) is taken from
        # the address that signed its request, as a greeting would have; envelope and transaction must
        # be signed alike, or the name stays unbound
        registered = self.addresses.get(env.sender) or signer(env)
        require(tx.sender == registered, f"transaction signed by {tx.sender}, not by {env.sender}'s address")
        self.addresses.setdefault(env.sender, registered)
        try:
            self._check(env, req, tx)
        except ProtocolError as exc:
            log.warning("transaction refused", sender=env.sender, function=req.function, reason=str(exc))
            return [self._receipt(env, req, None, f"refused by the ledger: {exc}", tx.sender)]
        replaces = self.replaced.get(_slot(tx))
        earlier = self.chain.mined(replaces) if replaces else None
        if earlier is not None:  # the one it replaces was mined after all: that is its receipt
            del self.replaced[_slot(tx)]
            return self._relayed(env, tx, earlier, self.chain.outcome(earlier, tx))
        try:
            receipt, reason, waiting = self.chain.send(raw, tx)
        except Underpriced as exc:  # (a node may hold it all the same: sent by a ledger before this one)
            log.info("transaction underpriced", sender=env.sender, function=req.function, reason=str(exc))
            self.replaced[_slot(tx)] = exc.tx_hash
            return [self._receipt(env, req, None, f"not sent: {exc}", tx.sender, sign_again=tx)]
        self.replaced.pop(_slot(tx), None)  # sent in its place: the node holds one of the two at most
        if waiting is not None:  # a chain that mines a block every so often: answered when it is mined
            self.pending[waiting] = (env, tx)
            log.info("transaction sent", sender=env.sender, function=req.function, tx_hash=waiting)
            return []
        return self._relayed(env, tx, receipt, reason)

    def _relayed(self, env: m.Envelope, tx: chain.RawTx, receipt, reason: str) -> list[m.Envelope]:
        """The signer's receipt and, if it went through, the events it caused."""
        req: m.TxRequest = env.payload
        out = [self._receipt(env, req, receipt, reason, tx.sender)]
        if receipt is not None:
            totals = self.gas.setdefault(req.function, {"calls": 0, "total": 0, "max": 0})
            totals.update(calls=totals["calls"] + 1, total=totals["total"] + receipt.gasUsed,
                          max=max(totals["max"], receipt.gasUsed))
        if receipt is not None and receipt.status == 1:
            out += self._publish(env, receipt)
        log.info("transaction relayed", sender=env.sender, function=req.function, ok=not reason,
                 gas=receipt.gasUsed if receipt is not None else 0, reason=reason or None)
        return out

    def tick(self, seconds: float) -> list[m.Envelope]:
        """Answer the transactions sent and since mined, and the greetings whose funding was (each
        tick: a second); the others wait on, but for one the chain will not mine: its gas price has
        fallen below the base fee, the node dropped it, or it has stayed in the pool for
        ``PATIENCE`` blocks (block producers took better tips). Its signer signs it again (a
        greeting's top-up, the ledger sends again). Kept requests go first."""
        out = self._kept_on(seconds)
        # read once a tick, and only if a transaction waits
        now = SimpleNamespace(floor=functools.cache(self.chain.base_fee),
                              block=functools.cache(self.chain.block_number))
        for tx_hash, (env, tx) in list(self.pending.items()):
            try:
                out += self._waited(tx_hash, env, tx, now)
            except OSError as exc:  # the node away: asked again at the next tick
                log.warning("receipt not read", tx_hash=tx_hash, reason=_unanswered(exc))
                break
        self.since = {h: b for h, b in self.since.items() if h in self.pending}
        return out

    def _kept_on(self, seconds: float) -> list[m.Envelope]:
        """The kept requests handled if the node answers now; those kept ``node_patience`` seconds
        given up (their signers told)."""
        self.kept = [(env, waited + seconds) for env, waited in self.kept]
        out = []
        while self.kept and self.kept[0][1] >= self.node_patience:
            env, waited = self.kept.pop(0)
            log.warning("kept request given up", type=env.type, sender=env.sender, seconds=round(waited))
            out += self.fault(env, f"the ledger gave it up: the chain node did not answer for {waited:.0f} s")
        return out + self._handle_kept()

    def _waited(self, tx_hash: str, env: m.Envelope, tx: chain.RawTx | None, now) -> list[m.Envelope]:
        """What a transaction sent, or a greeting's top-up, calls for now: its answer once mined;
        a transaction the chain will not mine, signed again by its signer (a top-up, sent again
        by the ledger); nothing while it may still be mined (it stays in ``pending``)."""
        receipt = self.chain.mined(tx_hash)
        if receipt is not None:
            del self.pending[tx_hash]
            return self._info(env) if tx is None else self._relayed(env, tx, receipt, self.chain.outcome(receipt, tx))
        held = self.chain.held(tx_hash)
        waited = now.block() - self.since.setdefault(tx_hash, now.block())
        stranded, outbid = self._stranded(tx or held, held is not None, now.floor, waited)
        if not stranded:
            return []
        log.info("transaction stranded", sender=env.sender, function=env.type if tx is None else env.payload.function,
                 tx_hash=tx_hash, reason=stranded)
        if tx is None:  # a greeting's top-up: the ledger sends it again (a dropped one, the same transfer)
            funding = self.chain.fund_again(tx_hash, held, *self._advice(held, outbid)) if held else self.chain.fund(
                env.payload.address)
            del self.pending[tx_hash]  # (only once done: a node that fails meanwhile leaves it for the next tick)
            if funding is None:  # mined at once, or funded meanwhile
                return self._info(env)
            self.pending[funding] = (env, None)
            return []
        answer = [self._receipt(env, env.payload, None, stranded, tx.sender, sign_again=tx, outbid=outbid)]
        del self.pending[tx_hash]
        self.replaced[_slot(tx)] = tx_hash
        return answer

    @staticmethod
    def _stranded(tx: chain.RawTx | None, held: bool, floor, waited: int) -> tuple[str, bool]:
        """Why the chain will not mine a transaction sent and not mined yet ("" while it may), and
        whether the reason is its tip (others outbid it: raised up to ``MAX_TIP``, beyond which it
        waits); ``tx`` None: a top-up the node dropped."""
        if tx is not None and tx.gas_price < floor():
            return (f"not mined: its gas price ({tx.gas_price} wei) fell below the chain's base fee "
                    f"({floor()} wei)", False)
        if not held:
            return "not mined: the chain node no longer holds it", False
        if waited >= PATIENCE and tx.tip < MAX_TIP:
            return (f"not mined in {waited} blocks at a tip of {tx.tip} wei: the chain's block producers took "
                    "others first", True)
        return "", False

    def _check(self, env: m.Envelope, req: m.TxRequest, tx: chain.RawTx) -> None:
        require(tx.to == self.chain.address, "transaction is not addressed to the escrow contract")
        function, args = chain.decode_call(tx.data)
        require(function == req.function, f"calldata calls {function}, the request says {req.function}")
        if function in JOB_FUNCTIONS:
            key = chain.job_key(env.job_id)
            require(args[0] == key, "transaction is for another job than its envelope")
            if function == "createJob":
                require(key not in self.jobs or self.jobs[key] == env.job_id, "job key already taken")
                self.parties[env.job_id].add(tx.sender.lower())
            self.jobs[key] = env.job_id
        if function in ("recordMetric", "recordMetrics"):
            chain.check_metric_proofs(function, args, req.proof, self.chain.key_hash(args[0]))

    def _receipt(self, env, req, receipt, reason: str, sender: str,
                 sign_again: chain.RawTx | None = None, outbid: bool = False) -> m.Envelope:
        """The signer's receipt, with the prices to sign at now (:meth:`_advice`); with
        ``sign_again``, the transaction to sign again."""
        price, tip = self._advice(sign_again, outbid)
        payload = m.TxReceipt(
            function=req.function, tx_hash=None if receipt is None else "0x" + bytes(receipt.transactionHash).hex(),
            mined=receipt is not None, ok=receipt is not None and receipt.status == 1,
            gas_used=0 if receipt is None else receipt.gasUsed, reason=reason, next_nonce=self.chain.nonce(sender),
            gas_price=price, tip=tip, sign_again=sign_again is not None)
        return self.ctx.reply(env, payload)

    def _advice(self, old: chain.RawTx | None = None, outbid: bool = False) -> tuple[int, int | None]:
        """The prices to sign at now (:meth:`Chain.prices`). In place of ``old``: prices that
        also replace it in a node that still holds it (a node may say it dropped a transaction
        that it still holds, behind a load balancer), and, ``outbid``, twice its tip up to
        ``MAX_TIP`` (its price, on a chain without a base fee): raised each ``PATIENCE`` blocks, a
        tip reaches what block producers take in a few rounds."""
        if old is None:
            return self.chain.prices()
        price, tip = self.chain.prices(max(TIP, _outbid(old.tip) if outbid else _raised(old.tip)))
        if tip is None:  # a chain without a base fee: the price is all there is
            return max(price, _outbid(old.gas_price) if outbid else _raised(old.gas_price)), None
        return max(price, _raised(old.gas_price)), tip

    def _publish(self, env: m.Envelope, receipt) -> list[m.Envelope]:
        out = []
        tx_hash = "0x" + bytes(receipt.transactionHash).hex()
        for name, args in self.chain.events(receipt):
            key = bytes.fromhex(args["job"][2:]) if "job" in args else None
            job_id = self.jobs.get(key, env.job_id)
            if name == "Withdrawn":  # no job's: its payee's, who asked for it (and left no empty party list)
                self.withdrawn[args["payee"]] += args["amount"]
                recipients = [env.sender]
            else:
                self._learn_parties(job_id, key, name, args)
                audience = chain.event_audience(name, args, self.parties[job_id], self.principals[job_id])
                recipients = sorted(address_recipient(a) for a in audience)
            event = m.ChainEvent(event=name, args=args, tx_hash=tx_hash, block=receipt.blockNumber)
            out += [self.ctx.message(job_id, env.round, r, event) for r in recipients]
            out.append(self.ctx.message(job_id, env.round, PROGRESS, event))
            if name in ("Settled", "Cancelled"):
                self._forget(job_id, key)
        return out

    def _learn_parties(self, job_id: str, key: bytes | None, name: str, args: dict) -> None:
        """The job's principals and parties as of this event: from the event that names them, else
        read back from the contract where this ledger's state does not (a job created before it, or
        settled and forgotten; a state saved before principals were kept)."""
        if name == "JobCreated":
            self.principals[job_id] = {args["buyer"].lower(), args["aggregator"].lower()}
        elif job_id not in self.principals:
            self.principals[job_id] = self.chain.principals(key)
        if job_id not in self.parties:
            self.parties[job_id] = self.chain.participants(key)
        self.parties[job_id] |= self.principals[job_id]
        if name == "ParticipantsSet":
            self.parties[job_id].update(a.lower() for a in [*args["trainers"], *args["validators"]])

    def _forget(self, job_id: str, key: bytes) -> None:
        """A job settled or cancelled on chain: all that follows are its payees' withdrawals, whose
        events go to the signer that asked. Its parties, principals and key are dropped, so what a
        long-running ledger keeps (and writes with each message, ``--state-dir``) is the jobs
        under way, not every job it relayed; a request of the job delivered again reads them back
        from the contract."""
        self.parties.pop(job_id, None)
        self.principals.pop(job_id, None)
        self.jobs.pop(key, None)

    def holds(self, job_id: str) -> bool:
        """Whether the ledger keeps the job's parties: its keyring keeps only those jobs' signers
        (a party's greetings are outside any job; its address is in :attr:`addresses`)."""
        return job_id in self.parties

    def gas_report(self) -> dict[str, dict[str, int]]:
        """Gas per contract function: calls, mean, max, total."""
        report = {fn: {"calls": v["calls"], "mean": v["total"] // v["calls"], "max": v["max"], "total": v["total"]}
                  for fn, v in sorted(self.gas.items())}
        if self.chain.deploy_gas:
            report["deploy"] = {"calls": 1, "mean": self.chain.deploy_gas, "max": self.chain.deploy_gas,
                                "total": self.chain.deploy_gas}
        return report
