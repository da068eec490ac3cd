"""Metrics on chain and what the contract pays for them: the model indices, the arguments and
proofs of ``recordMetric(s)``, and the contract's integer arithmetic (:func:`mse_micro`,
:func:`expected_settlement`), so anyone can predict a settlement to the wei."""

from __future__ import annotations

from typing import Mapping, Sequence

from eth_utils import keccak

from .. import messages as m
from ..errors import ProtocolError
from ..paillier import Decryption, PublicKey, verify_decryption
from ..settlement import Settlement, settle
from .contract import int_bytes, job_key, key_hash


def model_index(model: str, trainers: Sequence[str]) -> int:
    """0 for the full model, ``i + 1`` for the model without ``trainers[i]``."""
    from ..machine import FULL_MODEL, without
    if model == FULL_MODEL:
        return 0
    for i, t in enumerate(trainers):
        if model == without(t):
            return i + 1
    raise ProtocolError(f"unknown model {model}")


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
