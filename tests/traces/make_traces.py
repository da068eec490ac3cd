"""Record the committed traces: a complete diabetes job (5 owners, 2 rounds) on the memory bus.

    python tests/traces/make_traces.py

Writes one trace per agent, the owners' CSVs and the buyer's TEST key (a key
made for these fixtures only, never used for anything else).
"""

import asyncio
import hashlib
from pathlib import Path

from deltaml.agents.agent import Agent, Trace
from deltaml.agents.bus import MemoryBus
from deltaml.agents.parties import aggregator_core, buyer_core, new_key, owner_core, save_key
from deltaml.agents.runtime import run_buyer_job
from deltaml.data import demo_split, load_diabetes, write_csv
from deltaml.marketplace import DemoConfig, make_spec

HERE = Path(__file__).parent


def seed(name: str) -> bytes:
    return hashlib.sha256(f"deltaml-test-trace-{name}".encode()).digest()


async def main() -> None:
    config = DemoConfig(rounds=2, eval_every=1)
    data = load_diabetes()
    key = new_key(2048)
    save_key(key, HERE / "buyer.key.json")
    bus = MemoryBus()
    agents = []

    def traced(role, name, core, header):
        path = HERE / f"{name}.jsonl"
        path.unlink(missing_ok=True)
        trace = Trace(path, {"role": role, "name": name, "seed": seed(name).hex(), **header})
        return Agent(role, name, core, bus, trace)

    agents.append(traced("aggregator", "aggregator", aggregator_core("aggregator", seed("aggregator")), {}))
    for i, part in enumerate(demo_split(data, config.owners), start=1):
        name = f"owner-{i}"
        write_csv(part, HERE / f"{name}.csv")
        core = owner_core(name, str(HERE / f"{name}.csv"), True, seed(name))
        agents.append(traced("owner", name, core, {"data": f"{name}.csv", "auto_accept": True}))
    buyer = traced("buyer", "buyer", buyer_core("buyer", key, seed("buyer")), {"key": "buyer.key.json"})
    for agent in [*agents, buyer]:
        await agent.start()
    spec = make_spec(config, data, key.public.to_hex(), "buyer", escrow=False)
    job = await run_buyer_job(buyer, spec, job_id="trace-job")
    # the buyer is done; the owners still take the aggregator's last word (job_finished)
    for _ in range(200):
        if all(a.core.jobs["trace-job"].phase.name == "FINISHED" for a in agents if a.role == "owner"):
            break
        await asyncio.sleep(0.05)
    await bus.close()
    for agent in [*agents, buyer]:
        agent.trace.close()
    print("job", job.phase.name, "final MSE", job.published[config.rounds]["all"])


if __name__ == "__main__":
    asyncio.run(main())
