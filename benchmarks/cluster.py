"""A simulated slow-network cluster on one machine: N ranks, each in its own network namespace.

Topology: namespaces ``accob0..accobN-1``, each with one veth (``accobnI``, address
10.231.77.(I+1)/24) whose host end (``accobhI``) hangs on a bridge ``accobbr``. Each rank's
egress is limited by ``tc qdisc ... tbf rate <bandwidth>`` (netem is not available on these
machines), so rank I reaches the others only through its own rate-limited uplink, full duplex.
gloo is pointed at the namespace's interface (``GLOO_SOCKET_IFNAME``) and the ranks meet through
a ``FileStore`` on a shared file, so no TCP store has to be reachable across namespaces.

Everything carries the ``accob`` prefix and is removed on every exit path: normal end, exception,
Ctrl-C and SIGTERM/SIGHUP (turned into KeyboardInterrupt while ranks run). What a killed run left
behind is removed at the next start, under a lock file so that two harnesses never clean each
other's namespaces. Without root or iproute2 the same ranks run on loopback without a limit.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

logger = logging.getLogger("acco.benchmarks")

PREFIX = "accob"
BRIDGE = PREFIX + "br"
SUBNET = "10.231.77"
LOCK_PATH = "/tmp/accob-cluster.lock"
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
ROOT = Path(__file__).resolve().parents[1]


class RanksFailed(RuntimeError):
    """A rank exited with an error, or the ranks ran past their time limit."""


def parse_bandwidth(text: str) -> Optional[int]:
    """``"1gbit"``, ``"0.5gbit"``, ``"200mbit"`` → bits per second; ``"none"`` → None (no limit)."""
    value = text.strip().lower()
    if value in ("none", "unlimited", "0", ""):
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmgt]?bit)", value)
    if not match:
        raise ValueError(f"bandwidth {text!r}: write it like 500mbit, 1gbit or 2.5gbit (or none)")
    bps = int(float(match.group(1)) * _UNITS[match.group(2)])
    if bps < 10**5:
        raise ValueError(f"bandwidth {text!r} is too small to be useful")
    return bps


def format_bandwidth(bps: Optional[int]) -> str:
    if bps is None:
        return "unlimited"
    for unit in ("gbit", "mbit", "kbit"):
        if bps >= _UNITS[unit]:
            return f"{bps / _UNITS[unit]:g}{unit}"
    return f"{bps}bit"


def netns_unavailable_reason() -> Optional[str]:
    """Why namespaces cannot be used here, or None if they can."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (iproute2)"
    return None


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _ours(name: str) -> bool:
    return re.fullmatch(rf"{PREFIX}(\d+|br|[hn]\d+)", name) is not None


def leftovers() -> tuple[list[str], list[str]]:
    """Namespaces and links with our prefix that exist now."""
    namespaces = [line.split()[0] for line in _sh("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = []
    for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            links.append(parts[1].strip().split("@")[0])
    return [n for n in namespaces if _ours(n)], [link for link in links if _ours(link)]


def remove_all_ours() -> None:
    """Remove every namespace (and the processes left in it) and link with our prefix."""
    namespaces, links = leftovers()
    for ns in namespaces:
        for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _sh("ip", "netns", "del", ns, check=False)  # takes its veth ends (and their peers) along
    for link in links:
        _sh("ip", "link", "del", link, check=False)
    namespaces, links = leftovers()
    if namespaces or links:
        raise RuntimeError(f"could not remove {namespaces + links}")


@dataclass(frozen=True)
class Network:
    """How rank processes are started and which interface gloo uses."""

    kind: str  # "netns" or "loopback"
    world: int
    bandwidth_bps: Optional[int]

    def interface(self, rank: int) -> str:
        return f"{PREFIX}n{rank}" if self.kind == "netns" else "lo"

    def command(self, rank: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", f"{PREFIX}{rank}", *argv] if self.kind == "netns" else list(argv)


def _burst_bytes(bps: int) -> int:
    # tbf needs at least one timer tick's worth of tokens (rate / HZ, HZ up to 1000), and 512 KiB
    # keeps slow rates from stalling on a few MTU-sized bursts
    return max(512 * 1024, bps // 8 // 250)


def _create(world: int, bandwidth_bps: Optional[int]) -> None:
    _sh("ip", "link", "add", BRIDGE, "type", "bridge")
    _sh("ip", "link", "set", BRIDGE, "up")
    for rank in range(world):
        ns, host_end, ns_end = f"{PREFIX}{rank}", f"{PREFIX}h{rank}", f"{PREFIX}n{rank}"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        _sh("ip", "link", "set", ns_end, "netns", ns)
        _sh("ip", "link", "set", host_end, "master", BRIDGE)
        _sh("ip", "link", "set", host_end, "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{rank + 1}/24", "dev", ns_end)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_end, "up")
        if bandwidth_bps is not None:
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ns_end, "root", "tbf",
                "rate", f"{bandwidth_bps}bit", "burst", str(_burst_bytes(bandwidth_bps)), "latency", "100ms")


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt (as Ctrl-C does), so that ``finally`` cleans up."""
    def handler(signum, frame):  # noqa: ANN001
        raise KeyboardInterrupt(f"signal {signum}")

    if sys.platform == "win32" or not _in_main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def network(world: int, bandwidth_bps: Optional[int], kind: str = "auto") -> Iterator[Network]:
    """The ranks' network for the duration of the block; namespaces are gone afterwards.

    ``kind``: ``"netns"`` (fail if impossible), ``"loopback"``, or ``"auto"`` (netns if possible).
    """
    if kind not in ("auto", "netns", "loopback"):
        raise ValueError(f"network kind {kind!r}: auto, netns or loopback")
    reason = netns_unavailable_reason()
    if kind == "netns" and reason:
        raise RuntimeError(f"cannot build network namespaces: {reason}")
    if kind == "loopback" or reason:
        if reason and kind == "auto":
            logger.warning("no network namespaces (%s): running %d ranks on loopback with no bandwidth limit", reason, world)
        yield Network("loopback", world, None)
        return
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another harness's namespaces are not leftovers
        try:
            namespaces, links = leftovers()
            if namespaces or links:
                logger.warning("removing leftovers of an earlier run: %s", ", ".join(namespaces + links))
            remove_all_ours()
            _create(world, bandwidth_bps)
            yield Network("netns", world, bandwidth_bps)
        finally:
            remove_all_ours()


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """Terminate, then kill, each rank's process group (the rank and anything it started)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + wait_s
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))


def run_ranks(
    argv: Sequence[str],
    world: int,
    bandwidth_bps: Optional[int],
    *,
    timeout_s: float,
    kind: str = "auto",
    env: Optional[dict[str, str]] = None,
) -> Network:
    """Run ``argv`` as ``world`` ranks (RANK, WORLD_SIZE, ... set as torchrun would) and wait.

    Raises ``RanksFailed`` if a rank fails or the ranks run past ``timeout_s``; the other ranks
    are then stopped. Returns the network that was used.
    """
    with _signals_raise(), network(world, bandwidth_bps, kind) as net, tempfile.TemporaryDirectory(prefix="accob-") as tmp:
        procs: list[subprocess.Popen] = []
        try:
            for rank in range(world):
                rank_env = {
                    **os.environ, **(env or {}),
                    "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                    "GLOO_SOCKET_IFNAME": net.interface(rank),
                    "ACCO_BENCH_STORE": os.path.join(tmp, "store"),
                    "ACCO_BENCH_NETWORK": net.kind,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                }
                procs.append(subprocess.Popen(net.command(rank, argv), env=rank_env, cwd=ROOT, start_new_session=True,
                                              preexec_fn=_die_with_parent))
            _wait(procs, timeout_s)
        finally:
            _stop(procs, grace_s=5.0)
        return net


def _die_with_parent() -> None:
    """In the child before exec: Linux kills it if the launcher dies, even by SIGKILL (which no
    handler sees); ``ip netns exec`` execs the rank, and the setting survives exec."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            # the others would wait for the failed rank until their collective timeout
            raise RanksFailed(f"rank(s) failed: {', '.join(f'rank {r} exit code {c}' for r, c in failed)}")
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            raise RanksFailed(f"ranks still running after {timeout_s:.0f} s")
        with contextlib.suppress(subprocess.TimeoutExpired):
            next(p for p, c in zip(procs, codes) if c is None).wait(timeout=0.5)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m benchmarks.cluster --clean`` removes leftovers; ``--check W BW`` builds and removes a network."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean", action="store_true", help="remove namespaces and links left by a killed run")
    parser.add_argument("--show", action="store_true", help="list what exists with our prefix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    reason = netns_unavailable_reason()
    if reason:
        print(f"network namespaces unavailable: {reason}", file=sys.stderr)
        return 1
    if args.clean:
        with open(LOCK_PATH, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            remove_all_ours()
    namespaces, links = leftovers()
    print(f"namespaces: {namespaces or 'none'}; links: {links or 'none'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
