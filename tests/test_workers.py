"""The aggregator's worker pool: the same gradient steps as a plain loop, in other processes,
and no worker outlives a killed daemon."""

import os
import signal
import subprocess
import sys
import time

from deltaml.agents.workers import Workers
from deltaml.protocol.aggregator import _update
from deltaml.protocol.fixedpoint import FixedPoint
from deltaml.protocol.linear import step_size_q


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
        assert workers.map(_update, steps) == [_update(s) for s in steps]
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
    except FileNotFoundError:
        return False
