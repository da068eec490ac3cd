"""Worker pools: the aggregator's gradient steps and the buyer's refreshes and masked products are
the same as in a plain loop, they run in other processes, and no worker outlives a killed daemon."""

import os
import random
import signal
import subprocess
import sys
import time

from deltaml.agents.workers import Workers
from deltaml.data import demo_split, load_diabetes
from deltaml.protocol.aggregator.training import update_model
from deltaml.protocol.buyer.decryptions import _products, _refresh
from deltaml.protocol.fixedpoint import FixedPoint
from deltaml.protocol.linear import encode_stats, step_size_q, sufficient_stats
from deltaml.protocol.metric import mask_product_inputs
from deltaml.protocol.refresh import mask_for_refresh


def _pid(_):
    return os.getpid()


def test_gradient_steps_in_the_pool_equal_the_loop(keypair):
    pub, priv = keypair
    codec = FixedPoint()
    steps = []
    for k in range(5):
        w = [priv.encrypt(codec.encode(0.1 * (j + k))) for j in range(11)]
        grads = [[pub.encrypt(codec.encode(j - k - t, 64)) for j in range(11)] for t in range(3)]
        steps.append((pub, codec, w, grads, step_size_q(codec, 1.5, 300 + k)))
    workers = Workers(2)
    try:
        assert workers.map(update_model, steps) == [update_model(s) for s in steps]
        pids = set(workers.map(_pid, range(8)))
        assert os.getpid() not in pids and 1 <= len(pids) <= 2
    finally:
        workers.close()


def test_workers_stop_when_their_daemon_is_killed():
    script = ("import os, sys, time\n"
              "from deltaml.agents.workers import Workers\n"
              "w = Workers(2)\n"
              "print(' '.join(str(p) for p in w.pool._processes), flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"  # a zombie has stopped
    except (FileNotFoundError, ProcessLookupError):  # gone (read while it was being reaped: ESRCH)
        return False


def test_the_buyers_refreshes_and_products_in_the_pool_equal_the_loop(keypair):
    pub, priv = keypair
    codec, rng = FixedPoint(), random.Random(7)
    scale = 3 * codec.frac_bits
    models = [[priv.encrypt(codec.encode(0.3 * j - k, scale)) for j in range(11)] for k in range(3)]
    vb, drop = codec.value_bits(scale), scale - codec.frac_bits
    refreshes = [(priv, mask_for_refresh(pub, w, vb, drop, rng)[0], vb, drop, bytes([k]) * 32)
                 for k, w in enumerate(models)]
    part = demo_split(load_diabetes(), 5)[4]
    enc = encode_stats(sufficient_stats(part.X, part.y), codec)
    products = []
    for k, w in enumerate(models):
        u, v, u_bits, _, _ = mask_product_inputs(pub, enc, w, scale, rng)
        products.append((priv, u, v, u_bits, bytes([k + 9]) * 32, b"context"))
    workers = Workers(2)
    try:
        assert workers.map(_refresh, refreshes) == [_refresh(r) for r in refreshes]
        assert workers.map(_products, products) == [_products(p) for p in products]
    finally:
        workers.close()


def test_a_ctrl_c_to_the_process_group_leaves_the_workers_to_their_parent():
    """Ctrl-C signals every process of the terminal's group: each worker died of it with a
    KeyboardInterrupt traceback under the buyer's last line, and the pool broke mid-task."""
    workers = Workers(2)
    try:
        for pid in list(workers.pool._processes):
            os.kill(pid, signal.SIGINT)
        time.sleep(0.3)
        assert workers.map(abs, [-1, -2, -3]) == [1, 2, 3]  # still there, still working
    finally:
        workers.close()


def test_a_pool_whose_worker_was_killed_starts_new_workers_and_does_the_work(keypair):
    """A killed worker (the out-of-memory killer, an operator) broke the pool for good: every later
    ``map`` raised BrokenProcessPool, so each message after it failed three times and was given up."""
    workers = Workers(2)
    try:
        workers.warm(keypair[0])
        old = set(workers.pool._processes)
        os.kill(next(iter(old)), signal.SIGKILL)
        while all(_alive(p) for p in old):
            time.sleep(0.01)
        assert workers.map(abs, [-1, -2, -3]) == [1, 2, 3]
        new = set(workers.pool._processes)
        assert new and not new & old
        assert workers.map(abs, [-4]) == [4]  # and the new pool stays
        assert set(workers.pool._processes) == new
    finally:
        workers.close()
