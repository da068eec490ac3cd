"""The broker layout, mirroring ``deploy/rabbitmq/definitions.json``.

A topic exchange carries protocol traffic, routed by recipient
(``to.<name>``; owners also hear ``to.owners``). Each queue is also bound
to its agent's address (``to.<0x… in lower case>``): the ledger sends a chain
event to the addresses the contract names, so it reaches a job's parties
whether or not this ledger ever learnt their names. Every agent consumes its own
durable queue, which dead-letters into ``deltaml.dlx``/``deltaml.dead``.
Progress goes to a fan-out exchange that anyone may watch through
``deltaml.progress``. A test checks the JSON against these names.
"""

from __future__ import annotations

PROTOCOL_EXCHANGE = "deltaml.protocol"
DEAD_LETTER_EXCHANGE = "deltaml.dlx"
DEAD_LETTER_QUEUE = "deltaml.dead"
PROGRESS_EXCHANGE = "deltaml.progress"
PROGRESS_QUEUE = "deltaml.progress"
BROADCAST_OWNERS = "owners"
PROGRESS = "progress"
REASON_HEADER = "x-deltaml-reason"
ROLES = ("aggregator", "buyer", "owner", "ledger")


def routing_key(recipient: str) -> str:
    """Routing key of a message for ``recipient``."""
    return f"to.{recipient}"


def queue_name(role: str, name: str) -> str:
    """The durable queue an agent consumes: ``deltaml.<role>.<name>``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role}")
    return f"deltaml.{role}.{name}"


def address_recipient(address: str) -> str:
    """The recipient that reaches whoever signs as ``address`` (one spelling: lower case)."""
    return address.lower()


def bindings(role: str, name: str, address: str | None = None) -> list[str]:
    """Routing keys bound to an agent's queue: its name, its address if given, the owners' fan-out."""
    keys = [routing_key(name)]
    if address is not None:
        keys.append(routing_key(address_recipient(address)))
    if role == "owner":
        keys.append(routing_key(BROADCAST_OWNERS))
    return keys


def retry_exchange(attempt: int) -> str:
    """Where a delivery failed ``attempt`` times waits before it is tried again: a fan-out exchange
    into a queue of that name whose messages, once their time is up, are dead-lettered through the
    default exchange by the routing key they were published with, which names the agent's queue."""
    return f"deltaml.retry.{attempt}"


def retry_queue_arguments(delay: float) -> dict:
    """A retry queue: its messages expire after ``delay`` seconds (sooner if a message says so)."""
    return {"x-dead-letter-exchange": "", "x-message-ttl": int(delay * 1000), "x-queue-type": "classic"}


QUEUE_ARGUMENTS = {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE, "x-queue-type": "classic"}


def role_url(url: str, role: str) -> str:
    """``url`` with the role's own broker user (the development password is the user name).

    Only a URL that names a user is rewritten; production daemons get their own
    URL, with the role's real password, through ``--amqp-url``.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role}")
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    host = rest.rsplit("@", 1)[1]
    user = f"deltaml-{role}"
    return f"{scheme}://{user}:{user}@{host}"
