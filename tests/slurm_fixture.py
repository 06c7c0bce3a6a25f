"""Session fixture for a real single-node Slurm cluster (tests marked ``slurm``).

``slurm_cluster`` brings up the cluster with ``tests/slurm/start-slurm.sh`` (munged,
MariaDB + slurmdbd so ``sacct`` works, slurmctld, slurmd; about 20 s on first use,
which includes the apt-get install, about 2 s when the packages are present) and
stops it at the end of the session with ``tests/slurm/stop-slurm.sh``, but only if
this fixture started it. The stop script kills only the daemons whose pid files the
start script wrote under ``SLURM_BASE``, so a cluster that was already up (someone
else's, or one left running on purpose) is reused and left alone.

The fixture skips, with the reason, when the cluster cannot be had: not root, no
``apt-get``/``dpkg``, or the start script failed. With ``RETRO_REQUIRE_SLURM=1`` each
of those is a test failure instead (for the CI job that must exercise Slurm). The tail
of the start script's stderr goes into the reason only when ``CI`` is unset; in CI the
reason points at the log folder instead.

The cluster also has two more nodes, ``rtnode1`` and ``rtnode2`` in partition ``multi``: each
a network and UTS namespace of this machine, behind a bridge with private addresses
(``SLURM_NS_NODES=2`` to the start script). ``slurm_two_nodes`` gives them to the tests that
run multi-node jobs; where they could not be made, the single node still serves and those
tests skip (or fail under ``RETRO_REQUIRE_SLURM=1``) with the reason.

Knobs: ``RETRO_SLURM_BASE`` (default ``/tmp/retro-toolkit-slurm``) is passed to the
scripts as ``SLURM_BASE``; ``SLURM_DB_PORT`` etc. pass through to the start script.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parent / "slurm"
START_SCRIPT = SCRIPTS_DIR / "start-slurm.sh"
STOP_SCRIPT = SCRIPTS_DIR / "stop-slurm.sh"
DEFAULT_SLURM_BASE = "/tmp/retro-toolkit-slurm"
PARTITION = "debug"
MULTI_PARTITION = "multi"
NS_NODES = 2
# The interface each namespace node has on the bridge (start-slurm.sh).
NS_INTERFACE = "rt0"
# First start installs packages with apt-get; allow for a slow mirror.
START_TIMEOUT_S = 900
STOP_TIMEOUT_S = 120


@dataclass(frozen=True)
class SlurmCluster:
    partition: str
    hostname: str
    slurm_base: str
    #: True when this fixture started the daemons (and so stops them at teardown).
    started_here: bool
    #: Why the cluster has no two namespace nodes (None when it has them).
    no_two_nodes: str | None = None


@dataclass(frozen=True)
class TwoNodes:
    partition: str
    nodes: list[str]
    interface: str


def _unavailable(reason: str) -> None:
    """Skip, or fail when the run demands Slurm (RETRO_REQUIRE_SLURM=1)."""
    if os.environ.get("RETRO_REQUIRE_SLURM") == "1":
        pytest.fail(f"RETRO_REQUIRE_SLURM=1 but Slurm is unavailable: {reason}", pytrace=False)
    pytest.skip(f"Slurm cluster unavailable: {reason}")


def _cluster_up() -> bool:
    """A controller answers (`scontrol ping` exits 0 and says UP)."""
    if shutil.which("scontrol") is None:
        return False
    try:
        p = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and "UP" in p.stdout


def _node_for(partition: str) -> str | None:
    try:
        p = subprocess.run(
            ["sinfo", "-h", "-p", partition, "-o", "%N"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    nodes = p.stdout.strip()
    return nodes or None


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _start(env: dict[str, str]) -> tuple[object, str]:
    try:
        p = subprocess.run(["bash", str(START_SCRIPT)], env=env, capture_output=True, text=True,
                           timeout=START_TIMEOUT_S, check=False)
        return p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        err = e.stderr or ""
        return f"timeout after {START_TIMEOUT_S}s", err.decode(errors="replace") if isinstance(err, bytes) else err


def _stop(env: dict[str, str]) -> None:
    try:
        subprocess.run(
            ["bash", str(STOP_SCRIPT)],
            env=env,
            capture_output=True,
            text=True,
            timeout=STOP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        pass


@pytest.fixture(scope="session")
def slurm_cluster():
    base = os.environ.get("RETRO_SLURM_BASE", DEFAULT_SLURM_BASE)
    env = {**os.environ, "SLURM_BASE": base}

    no_two_nodes = None
    if _cluster_up():
        # Someone else's cluster (or one left running): reuse it, never stop it.
        started_here = False
    else:
        if os.geteuid() != 0:
            _unavailable("starting the local cluster needs root (tests/slurm/start-slurm.sh)")
        missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
        if missing:
            _unavailable(
                f"{' and '.join(missing)} not found; the local cluster installs Debian's "
                "slurm-wlm packages"
            )
        rc, err = _start({**env, "SLURM_NS_NODES": str(NS_NODES)})
        if rc != 0:  # without the namespace nodes, the single-node tests still run
            no_two_nodes = f"{START_SCRIPT.name} with SLURM_NS_NODES={NS_NODES} failed (exit {rc}): {_tail(err, 5)}"
            _stop(env)
            rc, err = _start(env)
        if rc != 0:
            _stop(env)  # stop whatever part of it did start (pid files under base only)
            reason = f"{START_SCRIPT.name} failed (exit {rc})"
            if os.environ.get("CI"):
                reason += f"; logs under {base}/log"
            else:
                reason += f"; stderr tail:\n{_tail(err)}"
            _unavailable(reason)
        started_here = True

    node = _node_for(PARTITION)
    if node is None:
        if started_here:
            _stop(env)
        _unavailable(f"the running cluster has no partition {PARTITION!r}")

    if "," in node or "[" in node:  # a multi-node partition: report this host
        node = socket.gethostname().split(".")[0]
    try:
        yield SlurmCluster(
            partition=PARTITION,
            hostname=node,
            slurm_base=base,
            started_here=started_here,
            no_two_nodes=no_two_nodes,
        )
    finally:
        if started_here:
            _stop(env)


@pytest.fixture(scope="session")
def slurm_two_nodes(slurm_cluster) -> TwoNodes:
    """The cluster's two namespace nodes, idle, in partition `multi`."""
    if slurm_cluster.no_two_nodes:
        _unavailable(slurm_cluster.no_two_nodes)
    try:
        p = subprocess.run(["sinfo", "-h", "-N", "-p", MULTI_PARTITION, "-o", "%N %T"], capture_output=True,
                           text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        _unavailable(f"sinfo failed: {e}")
    rows = [line.split() for line in p.stdout.splitlines() if line.strip()]
    if len(rows) != NS_NODES:
        _unavailable(f"the running cluster has {len(rows)} node(s) in partition {MULTI_PARTITION!r}, not "
                     f"{NS_NODES} (it was started without SLURM_NS_NODES={NS_NODES})")
    busy = [f"{n} is {state}" for n, state in rows if state not in ("idle", "mixed")]
    if busy:
        _unavailable(f"partition {MULTI_PARTITION!r}: {', '.join(busy)}")
    return TwoNodes(MULTI_PARTITION, [n for n, _ in rows], NS_INTERFACE)
