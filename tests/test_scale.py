"""The scale bench's many-owner job, small, over the real broker, and its crypto floor.

``benchmarks/scale.py`` (a) runs its owners in processes of their own and
times the rounds by the aggregator's own steps; these tests run it with a few
owners so that what the bench prints is known to come from a job that trained
every round, with its owners where it says they were.
"""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scale  # noqa: E402

from deltaml.protocol.powers import window_for  # noqa: E402
from deltaml.protocol.randomness import djn_exponent_bits, table_ready  # noqa: E402


async def test_many_owners_times_every_round_with_the_owners_in_their_own_processes(keypair):
    _, key = keypair
    r = await scale.many_owners(5, 3, key, rows=50, processes=2)
    assert r["owners"] == 5 and r["queues"] == 5 and r["processes"] == 2
    assert r["seconds_per_round"] > 0
    # the first requests leave before the first metric comes back, and both before the job ends
    assert 0 < r["training_from_seconds"] < r["first_metric_seconds"] < r["wall_seconds"]
    assert 0 < r["final_mse"] < r["first_mse"] / 2  # trained: the untrained model's error more than halved
    # the two owner processes' peak memory, read while they ran, and this process's
    memory = r["peak_memory_mb"]
    assert len(memory["owner processes"]) == 2 and all(x > 20 for x in memory["owner processes"])
    assert memory["this process"] > 20


async def test_many_owners_with_owners_in_the_aggregators_process(keypair):
    _, key = keypair
    r = await scale.many_owners(4, 2, key, rows=50, processes=2, owners_here=True)
    assert r["seconds_per_round"] > 0 and r["final_mse"] < r["first_mse"] / 2


def test_the_floor_of_many_owners_counts_every_trainers_work(keypair):
    _, key = keypair
    owners, rounds = 7, 2
    f = scale.many_owners_floor(owners, rounds, key, rows=50, processes=2)
    parts = f["parts_seconds"]
    assert set(parts) == {"obfuscator tables (one per owner process, at its first encryption)",
                          "trainers' products and re-randomisations", "aggregator's updates", "the first evaluation"}
    assert all(v > 0 for v in parts.values())
    assert f["total_seconds"] == sum(parts.values())
    assert f["seconds_per_round"] == f["total_seconds"] / f["cores"] / rounds
    # each owner process's trainers (3 of the 6 here) announce their draws: 21 per round each
    assert f["window"] == window_for(3 * rounds * 21, djn_exponent_bits(key.public.n))
    assert not table_ready(key.public.n)  # the floor's table is not left for the other tests' encryptions


async def test_the_rows_job_reports_its_peak_memory_and_a_csv_of_its_rows_reads_back(keypair):
    r = await scale.job(200, 1, keypair[1])
    assert r["rows"] == 200 and r["seconds_per_round"] > 0 and r["stats_seconds"] > 0
    assert r["peak_memory_mb"] > 20
    assert scale.csv_read_seconds(300) > 0  # (it checks the shape it read back)


def test_peak_memory_is_read_afresh_after_a_reset():
    scale.reset_peak_memory()
    before = scale.peak_memory_mb()
    block = bytearray(200 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # every page touched, so resident
    during = scale.peak_memory_mb()
    del block
    scale.reset_peak_memory()
    assert during > before + 150 and scale.peak_memory_mb() < during - 150


def test_the_paid_job_at_scale_counts_what_its_ledger_took_and_sent(keypair):
    r = scale.paid_job(3, 1, keypair)
    assert r["paid_wei"] > 0 and r["ledger_seconds"] > 0
    assert len(r["owners_peak_memory_mb"]) == 3 and all(x > 20 for x in r["owners_peak_memory_mb"])
    assert all(0 < own < peak for own, peak in zip(r["owners_private_memory_mb"], r["owners_peak_memory_mb"]))
    taken, sent = r["taken"], r["sent"]
    assert taken["chain_hello"] == 5 and taken["tx_request"] >= 3 + 3 + 4  # confirms, withdrawals, the buyer's
    # each event once to the progress exchange, and to at least one party; each request answered once at most
    assert sent["progress"] < sent["events to parties"] < 5 * sent["progress"]
    assert sent["answers"] <= sum(taken.values())


@pytest.mark.parametrize("args,says", [(["--owners", "1"], "--owners must be 0"),
                                       (["--paid-owners", "1"], "--paid-owners must be 0"),
                                       (["--owner-rounds", "0"], "--owner-rounds, --rounds and --paid-rounds"),
                                       (["--rounds", "0"], "--owner-rounds, --rounds and --paid-rounds"),
                                       (["--paid-rounds", "0"], "--owner-rounds, --rounds and --paid-rounds"),
                                       (["--rows", "10000", "0"], "--rows must all be at least 1")])
def test_a_scale_run_that_cannot_be_timed_is_a_usage_error(args, says):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert says in run.stderr and "Traceback" not in run.stderr
