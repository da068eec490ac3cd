"""The ledger agent: the only chain client. It relays what parties signed and reports what happened.

Theory of operation: a party greets the ledger with its address
(``ChainHello``) and learns the chain id, the contract and its nonce
(``ChainInfo``); on a development chain the ledger also tops its balance up
from the node's first account (the faucet). A ``TxRequest`` carries a
transaction the party signed itself; the ledger checks that the signer is
the address that party registered, that it calls our contract for the job
the envelope names, and — for a metric — that the Paillier decryption proof
verifies against the job's key committed on chain. Only then does it send
the transaction. The signer gets a ``TxReceipt``; every party of the job and
the progress exchange get each event the contract emitted (``ChainEvent``),
sent to the addresses the contract names for the job (each agent's queue is
bound to its address as well as its name). A request delivered again (the
ledger stopped before it acknowledged it) is answered from the chain: the
receipt and events of the transaction already mined, not a second send.

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

import ast
import pickle
import re
from collections import defaultdict
from typing import Any

import structlog
from eth_utils import is_address, to_checksum_address
from web3 import Web3
from web3.exceptions import TransactionNotFound

from ..protocol import chain
from ..protocol import messages as m
from ..protocol.auth import signer
from ..protocol.errors import ProtocolError
from ..protocol.machine import Context, require
from .topology import PROGRESS, address_recipient

log = structlog.get_logger()
FAUCET_TOPUP = 100 * 10**18
JOB_FUNCTIONS = {"createJob", "cancel", "setParticipants", "confirm", "drop", "recordMetric", "recordMetrics",
                 "abandon", "settle"}


class ChainUnavailable(RuntimeError):
    """No chain answers at the given URL."""


PLAIN_TRANSFER_GAS = 21_000


class Chain:
    """A web3 connection to a chain with the escrow contract deployed on it."""

    def __init__(self, url: str = "embedded", contract: str | None = None, faucet: bool = True) -> None:
        if url == "embedded":
            from web3 import EthereumTesterProvider
            self.w3 = Web3(EthereumTesterProvider())
        else:
            self.w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))
            if not self.w3.is_connected():
                raise ChainUnavailable(f"no Ethereum node answers at {url} (start one, e.g. `anvil`, or use --chain embedded)")
        self.url = url
        art = chain.artifact()
        accounts = self.w3.eth.accounts
        self.faucet = accounts[0] if faucet and accounts else None
        if contract is None:
            if self.faucet is None:
                raise ChainUnavailable("no contract address given and no unlocked account to deploy one")
            factory = self.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
            tx = factory.constructor().transact({"from": self.faucet})
            receipt = self.w3.eth.wait_for_transaction_receipt(tx)
            contract = receipt.contractAddress
            self.deploy_gas = receipt.gasUsed
        else:
            self.deploy_gas = 0
            contract = self._our_escrow(contract, art)
        self.contract = self.w3.eth.contract(address=to_checksum_address(contract), abi=art["abi"])
        self.chain_id = self.w3.eth.chain_id
        self._events = {Web3.keccak(text=chain.signature(e)): e["name"] for e in art["abi"] if e["type"] == "event"}
        self._key_hashes: dict[bytes, bytes] = {}
        self._errors = {Web3.keccak(text=chain.signature(e))[:4].hex(): e for e in art["abi"] if e["type"] == "error"}

    def _our_escrow(self, contract: str, art: dict) -> str:
        """A given contract address must hold this package's escrow, byte for byte: at an address
        without code a deposit would be a plain transfer that no contract could ever give back."""
        if not is_address(contract):
            raise ChainUnavailable(f"--contract {contract}: not an Ethereum address")
        code = bytes(self.w3.eth.get_code(to_checksum_address(contract)))
        if not code:
            raise ChainUnavailable(f"--contract {contract}: no contract at that address on {self.url}")
        if code != bytes.fromhex(art["deployed_bytecode"].removeprefix("0x")):
            raise ChainUnavailable(f"--contract {contract}: holds other code than this version's "
                                   f"{art['contract']} (deploy it with the ledger's default, no --contract)")
        return contract

    @property
    def address(self) -> str:
        return self.contract.address

    def balance(self, address: str) -> int:
        return self.w3.eth.get_balance(to_checksum_address(address))

    def nonce(self, address: str) -> int:
        return self.w3.eth.get_transaction_count(to_checksum_address(address), "pending")

    def fund(self, address: str) -> None:
        """Top a development account up so it can pay gas (and a deposit)."""
        if self.faucet is None or self.balance(address) >= FAUCET_TOPUP // 2:
            return
        to = to_checksum_address(address)
        transfer = {"from": self.faucet, "to": to, "value": FAUCET_TOPUP}
        if not self.w3.eth.get_code(to):  # a plain account: a transfer's fixed gas, no estimate (half the time)
            transfer["gas"] = PLAIN_TRANSFER_GAS
        tx = self.w3.eth.send_transaction(transfer)
        self.w3.eth.wait_for_transaction_receipt(tx)

    def gas_price(self) -> int:
        return 2 * self.w3.eth.gas_price

    def key_hash(self, job: bytes) -> bytes:
        """The key hash a job was created with (read once: createJob sets it and nothing changes it;
        a job not created yet reads as zero and is asked again)."""
        known = self._key_hashes.get(job)
        if known is None:
            known = bytes(self.contract.functions.jobInfo(job).call()[5])
            if any(known):
                self._key_hashes[job] = known
        return known

    def standing(self, job: bytes) -> m.EscrowStanding:
        """Where a job's escrow stands now (a view call: no transaction, no gas)."""
        state, aggregator, abandoned, enrolled = self.contract.functions.standing(job).call()
        return m.EscrowStanding(state=chain.JOB_STATES[state], aggregator=aggregator, abandoned=abandoned,
                                enrolled=enrolled)

    def parties(self, job: bytes) -> set[str]:
        """The addresses (lower case) the contract names for a job: its buyer, its aggregator, its
        trainers and validators once set; none for a job it does not hold."""
        buyer, aggregator = self.contract.functions.jobInfo(job).call()[:2]
        trainers, validators = self.contract.functions.participants(job).call()
        return {a.lower() for a in (buyer, aggregator, *trainers, *validators) if int(a, 16)}

    def credit(self, address: str) -> int:
        return self.contract.functions.credit(to_checksum_address(address)).call()

    def send(self, raw: bytes, tx: chain.RawTx) -> tuple[Any, str]:
        """Send a signed transaction; (receipt or None, revert reason).

        Idempotent: a transaction already mined (a request redelivered after the ledger stopped
        between mining it and publishing its receipt) is answered with its receipt, not sent again
        to fail as a used nonce while the chain holds its effect."""
        receipt = self.mined(raw)
        if receipt is None:
            try:
                tx_hash = self.w3.eth.send_raw_transaction(raw)
            except Exception as exc:  # rejected before mining, or reverted by eth-tester at once
                return None, self.reason(exc)
            receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
        if receipt.status == 1:
            return receipt, ""
        if receipt.gasUsed >= tx.gas:  # no reason to replay: with the node's gas the call would go through
            return receipt, f"out of gas (the transaction's limit: {tx.gas})"
        try:  # replay on the state before it to learn the contract's reason
            self.w3.eth.call({"from": tx.sender, "to": tx.to, "data": tx.data, "value": tx.value},
                             block_identifier=receipt.blockNumber - 1)
        except Exception as exc:
            return receipt, self.reason(exc)
        return receipt, "reverted"

    def mined(self, raw: bytes):
        """The receipt of this signed transaction if the chain has mined it, else None."""
        try:
            return self.w3.eth.get_transaction_receipt(Web3.keccak(raw))
        except TransactionNotFound:
            return None

    def reason(self, exc: Exception) -> str:
        """A readable revert reason: the contract's custom error with its arguments where one can be found."""
        text = " ".join(str(a) for a in exc.args) or type(exc).__name__
        candidates = [text, str(getattr(exc, "data", "") or "")]
        candidates += [a.hex() for a in exc.args if isinstance(a, (bytes, bytearray))]
        for literal in re.findall(r"b'(?:[^'\\]|\\.)*'", text):  # eth-tester prints the revert data as bytes
            try:
                candidates.append(ast.literal_eval(literal).hex())
            except (ValueError, SyntaxError):
                pass
        for candidate in candidates:
            hexdata = candidate.replace("0x", "")
            for selector, entry in self._errors.items():
                at = hexdata.find(selector)
                if at >= 0:
                    args = re.match(r"[0-9a-fA-F]*", hexdata[at + len(selector):]).group()
                    return chain.error_text(entry, bytes.fromhex(args[: len(args) // 2 * 2]))
        return text[:200]

    def events(self, receipt) -> list[tuple[str, dict]]:
        """The contract's events in a receipt, in log order, with JSON-friendly arguments."""
        out = []
        for entry in receipt.logs:
            if entry.address != self.contract.address or not entry.topics:
                continue
            name = self._events.get(bytes(entry.topics[0]))
            if name is None:
                continue
            decoded = getattr(self.contract.events, name)().process_log(entry)
            out.append((name, {k: _jsonable(v) for k, v in decoded.args.items()}))
        return out


def saved_chain(chain_id: int, contract: str) -> dict:
    """Where a ledger's saved state belongs."""
    return {"chain_id": chain_id, "contract": to_checksum_address(contract)}


def saved_contract(blob: bytes) -> str:
    """The escrow a ledger's :meth:`LedgerCore.snapshot` belongs to."""
    return pickle.loads(blob)["chain"]["contract"]


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return "0x" + bytes(v).hex()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class LedgerCore:
    """Registers parties, checks and relays their transactions, fans chain events out."""

    def __init__(self, ctx: Context, chain_: Chain) -> None:
        self.ctx = ctx
        self.chain = chain_
        self.addresses: dict[str, str] = {}            # party name → address
        self.jobs: dict[bytes, str] = {}               # contract job key → job id
        self.parties: dict[str, set[str]] = defaultdict(set)  # job id → addresses (lower)
        self.gas: dict[str, list[int]] = defaultdict(list)
        self.withdrawn: dict[str, int] = defaultdict(int)  # address → wei withdrawn

    def snapshot(self) -> bytes:
        """Who is who and each job's parties, for ``--state-dir``: a ledger restarted on the same
        chain and contract goes on relaying for parties that greeted the one before it."""
        return pickle.dumps({"chain": saved_chain(self.chain.chain_id, self.chain.address),
                             "addresses": self.addresses, "jobs": self.jobs,
                             "parties": dict(self.parties), "gas": dict(self.gas), "withdrawn": dict(self.withdrawn),
                             "rng": self.ctx.rng.getstate()})

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
        self.gas = defaultdict(list, state["gas"])
        self.withdrawn = defaultdict(int, state["withdrawn"])
        self.ctx.rng.setstate(state["rng"])

    def handle(self, env: m.Envelope) -> list[m.Envelope]:
        if env.type == "chain_hello":
            return self._hello(env)
        if env.type == "tx_request":
            return self._relay(env)
        if env.type == "escrow_query":
            return [self.ctx.reply(env, self.chain.standing(chain.job_key(env.job_id)))]
        raise ProtocolError(f"the ledger takes chain_hello, tx_request and escrow_query, not {env.type}")

    def _hello(self, env: m.Envelope) -> list[m.Envelope]:
        address = env.payload.address
        require(is_address(address), f"{address!r} is not an Ethereum address")
        known = self.addresses.get(env.sender)
        require(known is None or known.lower() == address.lower(),
                f"{env.sender} is already registered with another address")
        self.addresses[env.sender] = to_checksum_address(address)
        self.chain.fund(address)
        info = m.ChainInfo(chain_id=self.chain.chain_id, contract=self.chain.address,
                           nonce=self.chain.nonce(address), gas_price=self.chain.gas_price())
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
        receipt, reason = self.chain.send(raw, tx)
        out = [self._receipt(env, req, receipt, reason, tx.sender)]
        if receipt is not None:
            self.gas[req.function].append(receipt.gasUsed)
        if receipt is not None and receipt.status == 1:
            out += self._publish(env, receipt)
        log.info("transaction relayed", sender=env.sender, function=req.function, ok=not reason,
                 gas=receipt.gasUsed if receipt is not None else 0, reason=reason or None)
        return out

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

    def _receipt(self, env, req, receipt, reason: str, sender: str) -> m.Envelope:
        payload = m.TxReceipt(
            function=req.function, tx_hash=None if receipt is None else "0x" + bytes(receipt.transactionHash).hex(),
            mined=receipt is not None, ok=receipt is not None and receipt.status == 1,
            gas_used=0 if receipt is None else receipt.gasUsed, reason=reason, next_nonce=self.chain.nonce(sender))
        return self.ctx.reply(env, payload)

    def _publish(self, env: m.Envelope, receipt) -> list[m.Envelope]:
        out = []
        tx_hash = "0x" + bytes(receipt.transactionHash).hex()
        for name, args in self.chain.events(receipt):
            key = bytes.fromhex(args["job"][2:]) if "job" in args else None
            job_id = self.jobs.get(key, env.job_id)
            if key is not None and job_id not in self.parties:  # created before this ledger, which kept no state
                self.parties[job_id] = self.chain.parties(key)
            if name == "JobCreated":
                self.parties[job_id].update((args["buyer"].lower(), args["aggregator"].lower()))
            if name == "ParticipantsSet":
                self.parties[job_id].update(a.lower() for a in [*args["trainers"], *args["validators"]])
            if name == "Withdrawn":  # no job's: its payee's, who asked for it (and left no empty party list)
                self.withdrawn[args["payee"]] += args["amount"]
                recipients = [env.sender]
            else:
                recipients = sorted(address_recipient(a) for a in self.parties[job_id])
            event = m.ChainEvent(event=name, args=args, tx_hash=tx_hash, block=receipt.blockNumber)
            out += [self.ctx.message(job_id, env.round, r, event) for r in recipients]
            out.append(self.ctx.message(job_id, env.round, PROGRESS, event))
        return out

    def gas_report(self) -> dict[str, dict[str, int]]:
        """Gas per contract function: calls, mean, max, total."""
        report = {fn: {"calls": len(v), "mean": sum(v) // len(v), "max": max(v), "total": sum(v)}
                  for fn, v in sorted(self.gas.items())}
        if self.chain.deploy_gas:
            report["deploy"] = {"calls": 1, "mean": self.chain.deploy_gas, "max": self.chain.deploy_gas,
                                "total": self.chain.deploy_gas}
        return report
