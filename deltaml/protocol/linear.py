"""Linear regression by gradient descent on sufficient statistics.

A trainer holding rows ``X_i, y_i`` reduces them once to ``G_i = X_i^T X_i``
and ``b_i = X_i^T y_i`` (``X`` prefixed with a column of ones). A round of
full-batch gradient descent over all trainers is then
``w <- w - (lr/M) * sum_i (G_i w - b_i)``, the same update as centralised
gradient descent on the pooled rows. Under encryption a trainer's round costs
``d*d`` ciphertext-by-plaintext products whatever its row count.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .fixedpoint import FixedPoint
from .paillier import PublicKey
from .powers import MatrixPowers
from .randomness import SYSTEM_RANDOM, RandomSource


def with_intercept(X: np.ndarray) -> np.ndarray:
    """``X`` with a leading column of ones."""
    X = np.asarray(X, dtype=float)
    return np.column_stack([np.ones(len(X)), X])


@dataclass(frozen=True)
class SufficientStats:
    """``G = X^T X``, ``b = X^T y``, ``c = y^T y`` and the row count of one owner."""

    gram: np.ndarray
    moment: np.ndarray
    sq: float
    rows: int

    @property
    def dim(self) -> int:
        """Model dimension ``d`` (features + 1)."""
        return len(self.moment)

    def sse(self, w: np.ndarray) -> float:
        """Sum of squared errors of ``w`` on these rows: ``w^T G w - 2 b^T w + c``."""
        return float(w @ self.gram @ w - 2 * self.moment @ w + self.sq)


def sufficient_stats(X: np.ndarray, y: np.ndarray) -> SufficientStats:
    """One pass over an owner's rows."""
    return _stats(with_intercept(X), y)


def columns_stats(table: np.ndarray, features: Sequence[int], target: int) -> SufficientStats:
    """``sufficient_stats(table[:, features], table[:, target])`` without first copying the feature
    columns out of the table: ``[1, X]`` is filled from it directly. It is the same matrix, so the
    same sums to the bit (column by column, as numpy lays a column selection out), and at a million
    rows of 20 features 160 MB less at a time."""
    A = np.empty((len(table), len(features) + 1), order="F")
    A[:, 0] = 1.0
    for k, column in enumerate(features):
        A[:, k + 1] = table[:, column]
    return _stats(A, table[:, target])


def _stats(A: np.ndarray, y: np.ndarray) -> SufficientStats:
    y = np.asarray(y, dtype=float)
    return SufficientStats(gram=A.T @ A, moment=A.T @ y, sq=float(y @ y), rows=len(y))


def beyond_bound(stats: SufficientStats, magnitude_bits: int) -> str:
    """Which of ``X^T X``, ``X^T y`` and ``y^T y`` reaches the job's magnitude bound, or "" if none.

    Each is encrypted at a fixed-point scale whose room the job planned for values below
    ``2**magnitude_bits``: an owner whose sums are larger cannot take part (its columns need scaling).
    """
    bound = 2.0**magnitude_bits
    for name, values in (("X^T X", stats.gram), ("X^T y", stats.moment), ("y^T y", stats.sq)):
        largest = float(np.max(np.abs(values)))
        if not largest < bound:
            return (f"its {name} reaches {largest:.3g}, beyond the job's bound 2**{magnitude_bits} "
                    f"({bound:.3g}): the columns need scaling")
    return ""


@dataclass(frozen=True)
class EncodedStats:
    """Sufficient statistics with the Gram matrix encoded once at ``frac_bits``."""

    stats: SufficientStats
    gram_q: tuple[tuple[int, ...], ...]
    codec: FixedPoint
    powers: MatrixPowers

    def __deepcopy__(self, memo) -> "EncodedStats":
        return self  # frozen, and copied with every step of an owner's state otherwise

    def gram_times(self, pub: PublicKey, w: Sequence[int]) -> list:
        """``[G w]`` from ``[w]``: one multi-exponentiation over the rows of ``G``."""
        return self.powers.apply(pub, w)

    def moment_q(self, scale_bits: int) -> list[int]:
        """``b`` at ``scale_bits``, to line up with ``G [w]``."""
        return self.codec.encode_vector(self.stats.moment, scale_bits)


def encode_stats(stats: SufficientStats, codec: FixedPoint) -> EncodedStats:
    """Encode the Gram matrix for the encrypted products."""
    gram_q = tuple(tuple(codec.encode_vector(row)) for row in stats.gram)
    return EncodedStats(stats=stats, gram_q=gram_q, codec=codec, powers=MatrixPowers(gram_q))


def encrypted_gradient(
    pub: PublicKey,
    enc: EncodedStats,
    w: Sequence[int],
    scale_bits: int,
    rng: RandomSource = SYSTEM_RANDOM,
) -> list:
    """``[G w - b]`` at ``scale_bits + frac_bits`` from ``[w]`` at ``scale_bits``.

    ``-b`` is added as a fresh encryption, so every output carries new
    randomness and the aggregator cannot test guesses of ``G`` or ``b``.
    """
    b_q = enc.moment_q(scale_bits + enc.codec.frac_bits)
    return [pub.add(gw, pub.encrypt(-bj, rng)) for gw, bj in zip(enc.gram_times(pub, w), b_q)]


def step_size_q(codec: FixedPoint, lr: float, rows: int) -> int:
    """``lr / M`` at ``frac_bits``."""
    return codec.encode(lr / rows)


def encrypted_update(
    pub: PublicKey, codec: FixedPoint, w: Sequence[int], gradients: Sequence[Sequence[int]], eta_q: int
) -> list:
    """``[w'] = 2**(2f) [w] - eta * sum_i [g_i]``: the scale grows by ``2 * frac_bits``."""
    step = _update_powers(2 * codec.frac_bits, eta_q)
    return [step.apply(pub, [wj, pub.sum(g[j] for g in gradients)])[0] for j, wj in enumerate(w)]


@functools.lru_cache(maxsize=256)
def _update_powers(lift_bits: int, eta_q: int) -> MatrixPowers:
    """``2**lift_bits [w] - eta [g]`` as one multi-exponentiation: the squarings of the lift and of
    ``eta`` are shared (about 15% less than two separate powers); the same for every round."""
    return MatrixPowers([[1 << lift_bits, -eta_q]])


def gradient_descent(stats: Sequence[SufficientStats], lr: float, rounds: int) -> np.ndarray:
    """Plain gradient descent on pooled statistics, from ``w = 0``: the reference."""
    G = sum(s.gram for s in stats)
    b = sum(s.moment for s in stats)
    M = sum(s.rows for s in stats)
    w = np.zeros(len(b))
    for _ in range(rounds):
        w = w - (lr / M) * (G @ w - b)
    return w


def least_squares(stats: Sequence[SufficientStats]) -> np.ndarray:
    """The least-squares solution on pooled statistics."""
    G = sum(s.gram for s in stats)
    b = sum(s.moment for s in stats)
    return np.linalg.lstsq(G, b, rcond=None)[0]
