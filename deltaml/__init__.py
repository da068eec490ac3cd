"""DeltaML: a privacy-preserving machine-learning marketplace."""

import importlib.util
import os

__version__ = "0.1.0"

# eth-hash chooses its keccak backend on first use: pycryptodome's unless told. The embedded
# chain hashes its tries with thousands of small keccaks per transaction, where pycryptodome's
# per-call overhead dominates (12 us a call against pysha3's 2 us): the ledger's transactions in
# a demo took 1.20-1.36 s with it and 0.74-0.80 s with pysha3. Same digests; an operator's
# ETH_HASH_BACKEND still wins.
if importlib.util.find_spec("sha3") is not None:
    os.environ.setdefault("ETH_HASH_BACKEND", "pysha3")
