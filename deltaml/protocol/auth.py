"""Envelope signatures and the addresses they must come from.

Every envelope is signed with its sender's Ethereum key (secp256k1, the same
key that signs its transactions): the signature covers the keccak hash of a
domain tag and the envelope's compact JSON without the signature, so no field
— job, round, recipient, payload — can be changed or moved to another message.
The receiver recovers the signer and asks its :class:`Keyring` whether that
address may speak as the envelope's sender in that job:

- a pinned name (the aggregator and ledger an operator configured) must be
  signed by its pinned address in every job;
- any other name is bound to the address that first signed for it in that
  job — for an owner its join request, for the buyer its job request, for a
  party greeting the ledger its hello — and must keep that address (a
  validator's first word to the buyer is checked by the buyer's core against
  the address the aggregator reports it joined with);
- a payload that declares an address (a join request, a chain hello) must
  declare the signer's own.

Pure code: no I/O, the keyring is plain data an agent keeps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

from eth_keys import keys
from eth_keys.exceptions import BadSignature, ValidationError
from eth_utils import keccak

from . import messages as m
from .errors import ProtocolError

DOMAIN = b"deltaml-envelope-v1"
#: Bindings a keyring may gain past twice what it kept at its last trim before it trims again.
TRIM_SLACK = 256


class AuthError(ProtocolError):
    """An envelope whose signature is missing, invalid or from the wrong address."""


def digest(env: m.Envelope) -> bytes:
    """What a signature covers: the domain tag and the unsigned envelope."""
    return keccak(DOMAIN + m.encode(env.model_copy(update={"signature": None})))


def sign(env: m.Envelope, private_key: bytes) -> m.Envelope:
    """``env`` with its signature (65 bytes r‖s‖v, hex)."""
    signature = _signing_key(private_key).sign_msg_hash(digest(env))
    return env.model_copy(update={"signature": signature.to_bytes().hex()})


_UNSIGNED = b'"signature":null,"payload":'


def sign_encoded(env: m.Envelope, private_key: bytes) -> bytes:
    """``m.encode(sign(env, private_key))``, serialising the envelope once instead of twice.

    The unsigned wire form is what the signature covers; the signed one differs only in the
    signature's value. Every field before it is an id, a name or a number, and a JSON string
    holds no unescaped quote, so the first ``"signature":null`` is the envelope's own."""
    unsigned = m.encode(env if env.signature is None else env.model_copy(update={"signature": None}))
    signature = _signing_key(private_key).sign_msg_hash(keccak(DOMAIN + unsigned)).to_bytes().hex()
    signed = unsigned.replace(_UNSIGNED, b'"signature":"' + signature.encode() + b'","payload":', 1)
    if signed == unsigned:  # the envelope's field order changed: fall back to the slow way
        return m.encode(sign(env, private_key))
    return signed


@functools.lru_cache(maxsize=1024)
def _signing_key(private_key: bytes) -> keys.PrivateKey:
    """The key object once per key, not once per message (it derives the public key: a third of a
    signature's cost). A process may hold many agents, each with its key: the scale bench's
    owner processes hold 50, which a cache of 16 lost to each other on every message."""
    return keys.PrivateKey(private_key)


def signer(env: m.Envelope) -> str:
    """The checksummed address that signed ``env``; :class:`AuthError` if none can be recovered."""
    if not env.signature:
        raise AuthError("unsigned envelope")
    try:
        raw = bytes.fromhex(env.signature)
        signature = keys.Signature(raw)
        return signature.recover_public_key_from_msg_hash(digest(env)).to_checksum_address()
    except (ValueError, BadSignature, ValidationError, TypeError, OverflowError) as exc:
        raise AuthError(f"invalid signature ({exc.__class__.__name__})") from None


def _same(a: str, b: str) -> bool:
    return a.lower() == b.lower()


@dataclass
class Keyring:
    """Which address may sign as which party: pinned names, then first signer per job."""

    pinned: dict[str, str] = field(default_factory=dict)
    bound: dict[tuple[str, str], str] = field(default_factory=dict)
    trim_above: int = TRIM_SLACK  # bindings beyond which :meth:`trim` retains again

    def check(self, env: m.Envelope) -> str:
        """The signer of ``env`` if it may speak as ``env.sender`` in ``env.job_id``."""
        address = signer(env)
        declared = getattr(env.payload, "address", None)
        if declared is not None and not _same(declared, address):
            raise AuthError(f"{env.type} declares address {declared} but is signed by {address}")
        expected = self.pinned.get(env.sender) or self.bound.get((env.job_id, env.sender))
        if expected is not None and not _same(expected, address):
            raise AuthError(f"forged sender: {env.sender} in job {env.job_id or '-'} is {expected}, "
                            f"this envelope is signed by {address}")
        return address

    def bind(self, env: m.Envelope, address: str) -> None:
        """Remember the signer of an accepted envelope as its sender in that job (first one wins)."""
        self.bound.setdefault((env.job_id, env.sender), address)

    def retain(self, holds: Callable[[str], bool]) -> None:
        """Forget who signed for the jobs its party no longer holds (``holds(job_id)`` false; a
        binding outside any job stays). Its core refuses a message for a job it forgot, as late,
        whoever signs it; kept, the bindings grew by each job's parties for as long as a daemon
        served, and went into every checkpoint it wrote."""
        self.bound = {key: address for key, address in self.bound.items() if not key[0] or holds(key[0])}

    def trim(self, holds: Callable[[str], bool]) -> None:
        """:meth:`retain` once the bindings have doubled since the last time (and by
        :data:`TRIM_SLACK`): called after every message, it costs one comparison a message."""
        if len(self.bound) > self.trim_above:
            self.retain(holds)
            self.trim_above = 2 * len(self.bound) + TRIM_SLACK
