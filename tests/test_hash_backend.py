import os
import subprocess
import sys

from eth_hash.backends import pycryptodome, pysha3


def test_deltaml_hashes_with_pysha3_and_the_digests_are_the_same():
    # a fresh interpreter: eth-hash chooses its backend once, on first use
    env = {k: v for k, v in os.environ.items() if k != "ETH_HASH_BACKEND"}
    code = ("import deltaml, eth_hash.auto as a; a.keccak(b''); "
            "print(type(a.keccak.hasher.__self__).__name__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PySha3Backend"
    for data in (b"", b"deltaml", bytes(range(256)) * 400):
        assert pysha3.keccak256(data) == pycryptodome.keccak256(data)
