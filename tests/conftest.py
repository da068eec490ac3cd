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


MANAGEMENT = "http://127.0.0.1:15672/api/queues/%2F?columns=name"


def _queue_names() -> set[str] | None:
    """The broker's queues, by its management API (None if it does not answer: nothing is tidied)."""
    import base64
    import json
    import urllib.request

    request = urllib.request.Request(MANAGEMENT, headers={"Authorization": "Basic " + base64.b64encode(
        b"guest:guest").decode()})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return {q["name"] for q in json.load(response)}
    except (OSError, ValueError):
        return None


async def _delete_unused(names: set[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    try:
        for name in sorted(names):
            channel = await connection.channel()
            try:
                await channel.queue_delete(name, if_unused=True)
            except aio_pika.exceptions.AMQPError:  # in use (a daemon someone runs), or already gone
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()


@pytest.fixture(scope="session", autouse=True)
def _leave_the_broker_as_found():
    """The suite's parties each declare a durable queue under a fresh name; left behind, every stale
    owner queue took a copy of each later job offer, run after run. The queues the session made
    and nobody consumes are deleted at its end."""
    before = _queue_names()
    yield
    after = _queue_names()
    if before is not None and after is not None and after - before:
        import asyncio

        asyncio.run(_delete_unused(after - before))
