"""One marketplace, two buyers at once: the same ledger, aggregator and owners serve both jobs.

Each job keeps its own key, models, escrow and payments; an owner's wallet signs
for both (its nonces interleave) and its withdrawals pull what either job
credited. Both must end with the centralised model and exact payments.
"""

import asyncio

from deltaml.agents.agent import Agent
from deltaml.agents.bus import MemoryBus
from deltaml.agents.parties import buyer_core, load_wallet
from deltaml.agents.runtime import run_buyer_job
from deltaml.marketplace import DemoConfig, withdrawals, baselines, make_spec, memory_market, prepare_parts
from deltaml.protocol.buyer import BuyerPhase
from deltaml.protocol.paillier import generate_keypair


async def test_two_buyers_at_once_each_get_their_model_and_pay_exactly(keypair):
    config = DemoConfig(rounds=4, eval_every=2)
    data, parts = prepare_parts(config)
    expected = baselines(parts, config)["centralized_gd_mse"]
    keys = {"buyer-a": keypair, "buyer-b": generate_keypair(2048)}
    bus = MemoryBus()
    ledger, market, trust = memory_market(bus, config, parts)
    owners = [agent for agent in market if agent.role == "owner"]
    buyers = {name: Agent("buyer", name, buyer_core(name, priv, wallet=load_wallet(None)), bus, pinned=trust)
              for name, (_, priv) in keys.items()}
    agents = [*market, *buyers.values()]
    for agent in agents:
        await agent.start()
    try:
        async def buy(name):
            spec = make_spec(config, data, keys[name][0].to_hex(), name)
            job_id = f"job-of-{name}"
            await run_buyer_job(buyers[name], spec, job_id=job_id)
            return await withdrawals(ledger, buyers[name].core, job_id)

        jobs = dict(zip(buyers, await asyncio.gather(*(buy(name) for name in buyers))))
    finally:
        for agent in agents:
            await agent.stop()
        await bus.close()
    assert not bus.dead, [d.reason for d in bus.dead]
    for name, job in jobs.items():
        assert job.phase is BuyerPhase.FINISHED, (name, job.reason)
        assert abs(job.published[config.rounds]["all"] - expected) / expected < 1e-6
        assert sum(job.payments_wei.values()) + job.refund_wei == job.spec.deposit_wei
    # each owner was paid by both escrows, and the contract holds nothing
    for owner in owners:
        paid = [core_job.paid_wei for core_job in owner.core.jobs.values()]
        assert len(paid) == 2 and all(p > 0 for p in paid)
    assert ledger.chain.balance(ledger.chain.address) == 0
