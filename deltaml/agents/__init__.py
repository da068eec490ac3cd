"""Agents: thin asyncio adapters that connect the pure cores to a bus."""
