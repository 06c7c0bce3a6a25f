"""core/watch.py: a barrier that waits as long as every rank is alive, and fails once one goes
silent. Real processes on a real TCPStore; a silent rank is one stopped with SIGSTOP, as a
node that drops off the network (nothing closes, nothing answers)."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as td

REPO = Path(__file__).resolve().parents[1]

RANK = """
import sys, time
from retro_toolkit.core.watch import Watch, PeerLost
rank, wait_s = int(sys.argv[1]), float(sys.argv[2])
w = Watch(rank, 2, f"node{rank}", timeout_s=3.0, period_s=0.25)
print("joined", flush=True)
time.sleep(wait_s)
t0 = time.monotonic()
try:
    w.barrier()
    print(f"passed {time.monotonic() - t0:.1f}", flush=True)
except PeerLost as e:
    print(f"lost {time.monotonic() - t0:.1f} {e}", flush=True)
    sys.exit(3)
w.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path: Path, waits: tuple[float, float]):
    port = _free_port()
    store = td.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                        timeout=datetime.timedelta(seconds=30))
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(waits[r])], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env) for r in (0, 1)]
    for p in procs:
        assert p.stdout.readline().strip() == "joined"
    return store, procs


def test_a_barrier_waits_far_longer_than_the_timeout_while_every_rank_is_alive(tmp_path):
    store, procs = _start(tmp_path, (0.0, 8.0))  # rank 0 waits 8 s, the timeout is 3 s
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert float(outs[0].split()[1]) >= 7.0, outs


def test_a_silent_rank_fails_the_barrier_within_the_timeout_and_is_named(tmp_path):
    store, procs = _start(tmp_path, (0.0, 30.0))
    time.sleep(0.5)
    os.kill(procs[1].pid, signal.SIGSTOP)  # alive, holding its sockets, answering nothing
    try:
        out = procs[0].communicate(timeout=60)[0]
    finally:
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].wait()
    assert procs[0].returncode == 3, out
    waited = float(out.split()[1])
    assert 3.0 <= waited < 6.0, out  # the 3 s timeout, plus a beat or two
    assert "rank 1 on node node1 has not been heard from for" in out, out
    assert "its node died or lost its network" in out


def test_a_rank_that_loses_the_store_fails_the_barrier(tmp_path):
    store, procs = _start(tmp_path, (0.0, 30.0))
    del store  # the store's host goes away: rank 0 cannot reach it any more
    out = procs[0].communicate(timeout=60)[0]
    procs[1].kill()
    procs[1].wait()
    assert procs[0].returncode == 3, out
    assert "rank 0 lost the job's store at 127.0.0.1:" in out, out


def test_a_store_that_stops_answering_fails_every_barrier_within_the_timeout(tmp_path):
    """The job's store on another machine behind a cut link: connections stay open and every
    operation blocks (for as long as TCP retransmits); the waiting ranks give up on their own."""
    port = _free_port()
    host = subprocess.Popen([sys.executable, "-c",
                             "import datetime, time, torch.distributed as td\n"
                             f"s = td.TCPStore('127.0.0.1', {port}, is_master=True, wait_for_workers=False,"
                             " timeout=datetime.timedelta(seconds=30))\nprint('up', flush=True)\ntime.sleep(600)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline().strip() == "up"
        script = tmp_path / "rank.py"
        script.write_text(RANK)
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs = [subprocess.Popen([sys.executable, str(script), str(r), "1.0"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env) for r in (0, 1)]
        for p in procs:
            assert p.stdout.readline().strip() == "joined"
        os.kill(host.pid, signal.SIGSTOP)  # before either rank reaches the barrier (after 1 s)
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        host.kill()
        host.wait()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 3, out
        assert f"rank {r} has had no answer from the job's store at 127.0.0.1:{port}" in out, out
        assert 1.5 <= float(out.split()[1]) < 5.0, out  # 3 s of silence, counted from the last answer
