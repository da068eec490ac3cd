"""The ledger's chain: a web3 connection to a node (or the embedded EVM) with this package's
escrow deployed on it, read and written as the ledger needs, with the contract's reasons in words."""

from __future__ import annotations

import ast
import re
from typing import Any
from urllib.parse import urlsplit

from eth_utils import is_address, to_checksum_address
from web3 import Web3
from web3.exceptions import BlockNotFound, TimeExhausted, TransactionNotFound

from ...protocol import chain, fees
from ...protocol import messages as m
from ...protocol.errors import Transient

FAUCET_TOPUP = 100 * 10**18
PLAIN_TRANSFER_GAS = 21_000
TIP = 10**9  # wei per gas for the block's producer above the base fee (1 gwei, anvil's own default)
QUICK = 0.5  # seconds a relayed transaction is waited for before the ledger moves on (see send)
#: Blocks a transaction priced above the base fee may wait in the pool before its tip is raised: block
#: producers take the best tips first, so in a busy spell the parties' fixed one may never be enough.
PATIENCE = 5
#: The most a tip is raised to (wei per gas; the price, on a chain without a base fee): in a spell of
#: blocks that stay full, a transaction waits there rather than outbid without end (at 64 gwei a
#: 200,000-gas call pays 0.0128 ETH to the block's producer). A wallet's own ceiling by default, which
#: it would not sign beyond (:data:`deltaml.protocol.fees.MAX_TIP`).
MAX_TIP = fees.MAX_TIP


def shown(url: str) -> str:
    """A node's URL as messages and logs may show it: scheme, host and port only, since providers
    put API keys in the path, the query or the user part (``/…`` says something was left out)."""
    try:
        parts = urlsplit(url)
        host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    except ValueError:  # a port that is no number
        host = None
    if not host:
        return "the given URL"
    hidden = parts.path.strip("/") or parts.query or parts.fragment or parts.username or parts.password
    return f"{parts.scheme}://{host}" + ("/…" if hidden else "")


class ChainUnavailable(RuntimeError):
    """No chain answers at the given URL."""


class NonceAhead(Transient):
    """A transaction after one of the same sender's that the chain has not seen yet (waiting for its
    retry, the node having been unreachable): a fault, retried, so the earlier one goes first."""


class Underpriced(Exception):
    """A transaction whose gas price (or fee cap) is below the chain's base fee: no node would mine
    it (anvil refuses it, geth holds it until the fee falls), so it is not sent and its signer signs
    it again. ``tx_hash``: its hash (a node may hold it all the same, sent by an earlier ledger)."""

    def __init__(self, reason: str, tx_hash: str) -> None:
        super().__init__(reason)
        self.tx_hash = tx_hash


class Chain:
    """A web3 connection to a chain with the escrow contract deployed on it."""

    def __init__(self, url: str = "embedded", contract: str | None = None, faucet: bool = True) -> None:
        self.evm = None  # the embedded chain's py-evm chain, for what web3 asks of it too slowly
        if url == "embedded":
            from web3 import EthereumTesterProvider
            provider = EthereumTesterProvider()
            self.w3 = Web3(provider)
            self.evm = provider.ethereum_tester.backend.chain
        else:
            self.w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))
            if not self.w3.is_connected():
                raise ChainUnavailable(f"no Ethereum node answers at {shown(url)} (start one, e.g. `anvil`, "
                                       "or use --chain embedded)")
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
            raise ChainUnavailable(f"--contract {contract}: no contract at that address on {shown(self.url)}")
        if code != bytes.fromhex(art["deployed_bytecode"].removeprefix("0x")):
            raise ChainUnavailable(f"--contract {contract}: holds other code than this version's "
                                   f"{art['contract']} (deploy it with the ledger's default, no --contract)")
        return contract

    @property
    def address(self) -> str:
        return self.contract.address

    def balance(self, address: str, block: str = "latest") -> int:
        return self.w3.eth.get_balance(to_checksum_address(address), block)

    def nonce(self, address: str) -> int:
        return self.w3.eth.get_transaction_count(to_checksum_address(address), "pending")

    def fund(self, address: str) -> str | None:
        """Top a development account up so it can pay gas (and a deposit); the hash of the transfer
        if the chain has not mined it within ``QUICK`` seconds (as :meth:`send`), else None. A
        transfer already on its way counts (the balance is read at the pending block): a greeting
        delivered again does not send a second."""
        if self.faucet is None or self.balance(address, "pending") >= FAUCET_TOPUP // 2:
            return None
        to = to_checksum_address(address)
        transfer = {"from": self.faucet, "to": to, "value": FAUCET_TOPUP}
        if not self.w3.eth.get_code(to):  # a plain account: a transfer's fixed gas, no estimate (half the time)
            transfer["gas"] = PLAIN_TRANSFER_GAS
        return self._transfer(transfer)

    def fund_again(self, tx_hash: str, held: chain.RawTx, price: int, tip: int | None) -> str | None:
        """Send a top-up the node holds but will not mine again at these prices, at its nonce (the
        node takes it in place of the first); its hash, or None if mined within ``QUICK`` seconds.
        A node that refuses it keeps the first, which is waited for on: its hash (the first mined
        meanwhile, say: its nonce is used)."""
        transfer = {"from": held.sender, "to": held.to, "value": held.value, "gas": held.gas, "nonce": held.nonce}
        transfer.update({"gasPrice": price} if tip is None else {"maxFeePerGas": price, "maxPriorityFeePerGas": tip})
        try:
            return self._transfer(transfer)
        except OSError:
            raise
        except Exception:
            return tx_hash

    def _transfer(self, transfer: dict) -> str | None:
        tx_hash = self.w3.eth.send_transaction(transfer)
        return None if self._quickly(tx_hash) is not None else "0x" + bytes(tx_hash).hex()

    def _quickly(self, tx_hash: bytes):
        """The receipt if the chain mines the transaction within ``QUICK`` seconds, else None."""
        try:
            return self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=QUICK, poll_latency=0.02)
        except TimeExhausted:
            return None

    def prices(self, tip: int = TIP) -> tuple[int, int | None]:
        """What parties sign at: on a chain with a base fee, a fee cap of twice the next block's
        (so that a rising fee does not strand them at once) and a tip of ``tip``; without one, twice
        the node's price and no tip (a legacy transaction). Not from the node's suggestion where
        there is a base fee: anvil's and geth's follow the tips of recent blocks, which at legacy
        prices were ours (everything above the base fee is tip), so each price raised the next (a
        trial on anvil: 3 gwei to 755 in two steps)."""
        base = self.base_fee()
        return (2 * base + tip, tip) if base else (2 * self.w3.eth.gas_price, None)

    def base_fee(self) -> int:
        """The least gas price the next block takes (0 on a chain without EIP-1559 fees); the last
        block's on a node that keeps no pending block."""
        try:
            block = self.w3.eth.get_block("pending")
        except BlockNotFound:
            block = self.w3.eth.get_block("latest")
        return block.get("baseFeePerGas") or 0

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

    def participants(self, job: bytes) -> set[str]:
        """The addresses (lower case) of a job's trainers and validators once set; none for a job it
        does not hold."""
        trainers, validators = self.contract.functions.participants(job).call()
        return {a.lower() for a in (*trainers, *validators) if int(a, 16)}

    def principals(self, job: bytes) -> set[str]:
        """The addresses (lower case) of a job's buyer and aggregator; none for a job it does not hold."""
        return {a.lower() for a in self.contract.functions.jobInfo(job).call()[:2] if int(a, 16)}

    def credit(self, address: str) -> int:
        return self.contract.functions.credit(to_checksum_address(address)).call()

    def send(self, raw: bytes, tx: chain.RawTx) -> tuple[Any, str, str | None]:
        """Send a signed transaction; (receipt or None, revert reason, hash of a transaction sent
        and not mined yet). A chain that mines at once (the embedded one, anvil's default) answers
        within ``QUICK`` seconds; on one that mines a block every so often the ledger does not wait
        for it, holding every other party's request: the hash comes back, for :meth:`mined` and
        :meth:`outcome` later.

        A node unreachable (``OSError``) and a nonce ahead of the chain's (:class:`NonceAhead`) raise:
        the request is retried later, not answered as refused. A gas price below the chain's base
        fee raises :class:`Underpriced`: its signer is to sign it again.

        Idempotent: a transaction already mined (a request redelivered after the ledger stopped
        between mining it and publishing its receipt) is answered with its receipt, and one the
        node already holds is not sent again to fail as a used nonce."""
        tx_hash = Web3.keccak(raw)
        receipt = self.mined(tx_hash)
        if receipt is None:
            pending = self.nonce(tx.sender)
            if tx.nonce > pending:  # a node would hold it until the gap is filled, and its sender's later ones
                raise NonceAhead(f"{tx.sender}'s transaction has nonce {tx.nonce}, the chain expects {pending}: "
                                 "an earlier one of that sender has not reached the chain yet")
            floor = self.base_fee()
            if tx.gas_price < floor:
                raise Underpriced(f"its gas price ({tx.gas_price} wei) is below the chain's base fee ({floor} wei)",
                                  "0x" + tx_hash.hex())
            try:
                self.w3.eth.send_raw_transaction(raw)
            except OSError:  # the node did not answer: not a refusal, a fault to retry (the ack policy)
                raise
            except Exception as exc:  # rejected before mining, or reverted by eth-tester at once
                if not self.pooled(tx_hash):  # (sent before, by a ledger that stopped before it said so)
                    return None, self.reason(exc), None
            receipt = self._quickly(tx_hash)
            if receipt is None:
                return None, "", "0x" + tx_hash.hex()
        return receipt, self.outcome(receipt, tx), None

    def outcome(self, receipt, tx: chain.RawTx) -> str:
        """A mined transaction's revert reason ("" if it succeeded)."""
        if receipt.status == 1:
            return ""
        if receipt.gasUsed >= tx.gas:  # no reason to replay: with the node's gas the call would go through
            return f"out of gas (the transaction's limit: {tx.gas})"
        try:  # replay on the state before it to learn the contract's reason
            self.w3.eth.call({"from": tx.sender, "to": tx.to, "data": tx.data, "value": tx.value},
                             block_identifier=receipt.blockNumber - 1)
        except OSError:
            raise
        except Exception as exc:
            return self.reason(exc)
        return "reverted"

    def block_number(self) -> int:
        return self.w3.eth.block_number

    def pooled(self, tx_hash: bytes | str) -> bool:
        """Whether the node holds this transaction, mined or waiting to be."""
        return self.held(tx_hash) is not None

    def held(self, tx_hash: bytes | str) -> chain.RawTx | None:
        """The transaction the node holds under this hash, mined or waiting to be (None if none)."""
        if self._unknown(tx_hash):
            return None
        try:
            tx = self.w3.eth.get_transaction(tx_hash)
        except TransactionNotFound:
            return None
        cap = tx.get("maxFeePerGas") or tx["gasPrice"]
        return chain.RawTx(sender=tx["from"], nonce=tx["nonce"], to=tx["to"], value=tx["value"],
                           data=bytes(tx["input"]), gas=tx["gas"], gas_price=cap,
                           tip=tx.get("maxPriorityFeePerGas", cap))

    def mined(self, tx_hash: bytes | str):
        """The receipt of this transaction if the chain has mined it, else None."""
        if self._unknown(tx_hash):
            return None
        try:
            return self.w3.eth.get_transaction_receipt(tx_hash)
        except TransactionNotFound:
            return None

    def _unknown(self, tx_hash: bytes | str) -> bool:
        """Whether the embedded chain holds no transaction of this hash, from py-evm's index of mined
        ones and the pending block (False elsewhere: the node is asked). eth-tester answers that
        by reading every block back from the head (its own "TODO"), and every relay asks it first
        of the transaction it is about to send: 0.4 ms with 10 blocks, 146 ms with 1,000, so a
        ledger on the embedded chain slowed with each job it had relayed."""
        if self.evm is None:
            return False
        digest = bytes.fromhex(tx_hash.removeprefix("0x")) if isinstance(tx_hash, str) else bytes(tx_hash)
        if any(tx.hash == digest for tx in self.evm.get_block().transactions):
            return False
        from eth.exceptions import TransactionNotFound as NotInIndex  # py-evm: with the embedded chain only

        try:
            self.evm.chaindb.get_transaction_index(digest)
        except NotInIndex:
            return True
        return False

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


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return "0x" + bytes(v).hex()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
