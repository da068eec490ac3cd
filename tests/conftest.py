import random

import numpy as np
import pytest

from deltaml.protocol.fixedpoint import FixedPoint
from deltaml.protocol.paillier import generate_keypair


@pytest.fixture(scope="session")
def keypair():
    """One 2048-bit key pair for the whole session (key generation is the slow part)."""
    return generate_keypair(2048)


@pytest.fixture
def codec():
    return FixedPoint()


@pytest.fixture
def rng():
    return random.Random(7)


@pytest.fixture
def rows():
    gen = np.random.default_rng(3)
    X = gen.normal(size=(40, 3))
    y = X @ np.array([2.0, -1.0, 0.5]) + 4 + gen.normal(size=40)
    return X, y


from deltaml.agents.runtime import configure_logging

configure_logging("console", "warning")

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def pytest_terminal_summary(terminalreporter):
    """After the fault tests (``make faults``): one row per injected fault, with its books."""
    import sys

    if "fault_harness" not in sys.modules:
        return
    rows = sys.modules["fault_harness"].RESULTS
    if not rows:
        return
    w = terminalreporter.write_line
    w("")
    w(f"{'fault':<40}{'injected':>9}{'finished':>9}{'failed cleanly':>15}{'messages':>9}"
      f"{'lost':>6}{'wei at stake':>22}{'wei lost':>9}")
    for r in rows:
        w(f"{r['fault']:<40}{r['injected']:>9}{r['finished']:>9}{r['failed_cleanly']:>15}{r['messages']:>9}"
          f"{r['messages_lost']:>6}{r['wei_deposited']:>22}{r['wei_lost']:>9}")
