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
