"""The pure protocol: messages, state machines, crypto and maths. No I/O here.

Nothing in this package imports a broker, a chain client or an event loop; the
agents in :mod:`deltaml.agents` adapt it to the world.
"""
