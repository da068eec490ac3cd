"""A deterministic, cryptographically strong random source (SHAKE-256 in counter mode).

Agents draw every mask and every Paillier randomness from one of these,
seeded from the operating system. Paillier obfuscators come from one
numbered stream per key, derived from the same seed
(:class:`~deltaml.protocol.randomness.ObfuscatorStream`), so that a helper
thread can compute them ahead in idle time without changing what a replay
produces. Recording the seed in an agent's private
trace is what makes a run replayable bit for bit; without the seed the
stream is as unpredictable as the OS's.
"""

from __future__ import annotations

import hashlib
import os
import random

from .paillier import PublicKey
from .randomness import ObfuscatorStream


class Drbg(random.Random):
    """``random.Random`` interface over a SHAKE-256 keystream."""

    def __init__(self, seed: bytes | None = None) -> None:
        self._seed = os.urandom(32) if seed is None else bytes(seed)
        self._counter = 0
        self._buffer = b""
        self.streams: dict[int, ObfuscatorStream] = {}
        super().__init__(0)

    @property
    def seed_bytes(self) -> bytes:
        """The seed (secret: whoever has it can recompute every mask)."""
        return self._seed

    def seed(self, a=None, version=2) -> None:  # random.Random calls this from __init__
        pass

    def _take(self, n: int) -> bytes:
        while len(self._buffer) < n:
            block = hashlib.shake_256(self._seed + self._counter.to_bytes(8, "big")).digest(4096)
            self._counter += 1
            self._buffer += block
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def getrandbits(self, k: int) -> int:
        if k <= 0:
            return 0
        value = int.from_bytes(self._take((k + 7) // 8), "big")
        return value >> ((8 - k % 8) % 8)

    def random(self) -> float:
        return self.getrandbits(53) / (1 << 53)

    def obfuscators(self, pub: PublicKey) -> ObfuscatorStream:
        """The numbered obfuscator stream of ``pub`` (made on first use)."""
        stream = self.streams.get(int(pub.n))
        if stream is None:
            seed = hashlib.shake_256(b"deltaml-obfuscators" + self._seed + format(pub.n, "x").encode()).digest(32)
            stream = self.streams[int(pub.n)] = ObfuscatorStream(pub, seed)
        return stream

    def getstate(self):
        """Seed, counter, unread bytes and how far each obfuscator stream got: as secret as the
        seed (a checkpoint is kept 0600)."""
        return (self._seed, self._counter, self._buffer, {n: s.taken for n, s in self.streams.items()})

    def setstate(self, state) -> None:
        self._seed, self._counter, self._buffer, taken = state
        self.streams = {}
        for n, count in taken.items():
            stream = self.obfuscators(PublicKey(n))
            stream.taken = stream.claimed = count
