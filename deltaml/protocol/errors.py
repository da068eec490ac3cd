"""Errors the protocol raises. Each carries a message a person can act on."""


class ProtocolError(Exception):
    """A message that breaks the protocol: wrong state, wrong sender, wrong shape."""


class InvalidTransition(ProtocolError):
    """A message type that the current state does not accept."""


class JobOver(InvalidTransition):
    """A message for a job that has finished or failed: one in flight when it ended, expected and
    refused without alarm."""


class Transient(Exception):
    """A fault expected to pass (a node not answering, a message ahead of one it needs): the
    delivery is retried after a wait, and logged in one line, without a traceback. Its message
    must be safe to log."""


class DecodeError(ProtocolError):
    """A message that cannot be decoded: bad JSON, unknown type or schema version."""


class NotACiphertext(ProtocolError):
    """A number where a ciphertext under the job's key belongs, which cannot be one."""


class DecryptionRefused(ProtocolError):
    """The buyer refuses a decryption it was not expecting (no decryption oracle)."""


class OutsideMask(DecryptionRefused):
    """A decrypted value outside the range every honestly masked value lies in. Refusing it
    tells the requester one bit about the plaintext, so the buyer ends the job on the first:
    a requester free to try again could binary-search any plaintext (a range oracle)."""


class FixedPointOverflow(ValueError):
    """A value that does not fit the fixed-point range; never wrapped silently."""


class KeyTooShort(ValueError):
    """A Paillier key shorter than the protocol allows."""


class ProofInvalid(ProtocolError):
    """A verifiable decryption or proof that does not check."""
