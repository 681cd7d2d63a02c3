"""Hosts on one machine: network namespaces joined by veth pairs to a bridge, with links cut
or made lossy by iptables inside the namespaces (design section 12).

Layout: one namespace holds only the bridge (`br0`); every host is a namespace with one
`eth0`, the peer of a veth pair whose other end is a port of that bridge. The pairs are
created directly inside their namespaces, so the machine's own namespace is never touched
(no interface, address, route or rule is added there). Addresses come from 198.18.0.0/15,
the range reserved for benchmarking, and no route leads beyond the bridge.

Faults are iptables rules in a host's own chains (`IWF-CUT`, `IWF-LOSS`), reached from its
INPUT and OUTPUT chains for `eth0` only (loopback inside a host stays clean):
- a partition drops everything between two hosts, both directions, on one side;
- loss drops each arriving packet with probability P (`-m statistic --mode random`).
This kernel has no `netem`: there is no delay or reordering injection, only drops.

Every namespace is named `iwf-<pid>-<n>-<host>`. `Network.close()` deletes them (the
fixtures call it in `finally`), and `sweep()` deletes those left by a process that is gone
(a run killed before its finalizers), after killing what still runs inside them.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

PREFIX = "iwf-"
SUBNET = "198.18.0"  # hosts get 198.18.0.2 .. 198.18.0.254 on a /24; nothing routes out
CLONE_NEWNET = 0x40000000
_counter = itertools.count(1)
T = TypeVar("T")


class NetnsUnavailable(RuntimeError):
    """This machine cannot build the hosts (not root, no `ip`, no iptables)."""


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why the hosts cannot be built here, or None: `ip`, iptables and CAP_NET_ADMIN."""
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install iproute2 iptables)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        made = _run(["ip", "netns", "add", probe], check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace (CAP_NET_ADMIN?): {made.stderr.strip()}"
        rule = _run(["ip", "netns", "exec", probe, "iptables", "-w", "-S"], check=False)
        if rule.returncode != 0:
            return f"iptables does not work in a namespace: {rule.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


def _namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep() -> list[str]:
    """Delete the namespaces of processes that are gone (and kill what runs in them)."""
    removed = []
    for name in _namespaces():
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        _kill_inside(name)
        _run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(ns: str) -> None:
    """SIGKILL every process still inside namespace `ns` (ours: only we start them)."""
    out = _run(["ip", "netns", "pids", ns], check=False).stdout
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


def _setns(ns: str) -> None:
    """Move the calling thread (only it) into namespace `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Host:
    """One namespace with one address on the bridge."""

    name: str
    ns: str
    ip: str

    def argv(self, command: Sequence[str]) -> list[str]:
        """`command` run inside this host (`ip netns exec` execs it: the pid is the command's)."""
        return ["ip", "netns", "exec", self.ns, *command]

    def iptables(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self.argv(["iptables", "-w", *args]), check=check)

    def call(self, fn: Callable[[], T], timeout_s: float = 600.0) -> T:
        """Run `fn` on a thread that has entered this host: its sockets live here."""
        box: dict[str, object] = {}

        def body() -> None:
            try:
                _setns(self.ns)
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc

        thread = threading.Thread(target=body, name=f"in-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"{fn!r} in {self.name} still running after {timeout_s} s")
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]

    def wait_tcp(
        self, ip: str, port: int, proc: subprocess.Popen[bytes] | None, within_s: float = 30.0
    ) -> None:
        """From this host, wait until `ip:port` accepts a connection (or `proc` exits)."""

        def poll() -> None:
            deadline = time.monotonic() + within_s
            while time.monotonic() < deadline:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"server for {ip}:{port} exited ({proc.returncode})")
                try:
                    with socket.create_connection((ip, port), timeout=1.0):
                        return
                except OSError:
                    time.sleep(0.05)
            raise TimeoutError(f"{ip}:{port} not accepting from {self.name} in {within_s} s")

        self.call(poll, within_s + 5.0)


class Network:
    """A bridge and the hosts plugged into it; `close()` deletes every namespace."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.bridge_ns = f"{self.tag}-br"
        self.hosts: dict[str, Host] = {}
        self._ports = itertools.count(1)
        self._addresses = itertools.count(2)
        self._cuts: set[tuple[str, str]] = set()
        self._loss: dict[str, float] = {}
        self._dropped: dict[str, int] = {}  # by rules since deleted, per host
        _run(["ip", "netns", "add", self.bridge_ns])
        try:
            _run(["ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.bridge_ns, "link", "set", "br0", "up"])
        except BaseException:
            self.close()
            raise

    def add(self, name: str) -> Host:
        """A new host on the bridge (also while the others run: a host added under load)."""
        if name in self.hosts or len(name) > 12:
            raise ValueError(f"host name {name!r} taken or too long")
        n = next(self._addresses)
        if n > 254:
            raise ValueError("the /24 is full")
        host = Host(name, f"{self.tag}-{name}", f"{SUBNET}.{n}")
        port = f"p{next(self._ports)}"
        _run(["ip", "netns", "add", host.ns])
        self.hosts[name] = host
        ip_h = ["ip", "-n", host.ns]
        ip_b = ["ip", "-n", self.bridge_ns]
        _run([*ip_h, "link", "add", "eth0", "type", "veth", "peer", "name", port])
        _run([*ip_h, "link", "set", port, "netns", self.bridge_ns])
        _run([*ip_b, "link", "set", port, "master", "br0"])
        _run([*ip_b, "link", "set", port, "up"])
        _run([*ip_h, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
        _run([*ip_h, "link", "set", "lo", "up"])
        _run([*ip_h, "link", "set", "eth0", "up"])
        for chain in ("IWF-CUT", "IWF-LOSS"):
            host.iptables("-N", chain)
        host.iptables("-A", "INPUT", "-i", "eth0", "-j", "IWF-CUT")
        host.iptables("-A", "INPUT", "-i", "eth0", "-j", "IWF-LOSS")
        host.iptables("-A", "OUTPUT", "-o", "eth0", "-j", "IWF-CUT")
        return host

    # -- faults ------------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        """Partition hosts `a` and `b` (both directions; the rest of the net is unaffected)."""
        key = (min(a, b), max(a, b))
        if key in self._cuts:
            return
        ha, hb = self.hosts[a], self.hosts[b]
        ha.iptables("-A", "IWF-CUT", "-s", hb.ip, "-j", "DROP")
        ha.iptables("-A", "IWF-CUT", "-d", hb.ip, "-j", "DROP")
        self._cuts.add(key)

    def heal(self, a: str, b: str) -> None:
        key = (min(a, b), max(a, b))
        if key not in self._cuts:
            return
        ha, hb = self.hosts[key[0]], self.hosts[key[1]]
        for h, other in ((ha, hb), (hb, ha)):
            before = self._chain_drops(h.name)
            for flag in ("-s", "-d"):
                h.iptables("-D", "IWF-CUT", flag, other.ip, "-j", "DROP", check=False)
            self._keep_drops(h.name, before)
        self._cuts.discard(key)

    def isolate(self, name: str) -> None:
        """Cut `name` from every other host."""
        for other in self.hosts:
            if other != name:
                self.cut(name, other)

    def lossy(self, probability: float, names: Sequence[str] | None = None) -> None:
        """Drop each packet arriving at these hosts (default: all) with `probability`:
        with every host lossy, every link loses about that share in each direction."""
        if not 0.0 < probability < 1.0:
            raise ValueError(f"loss probability {probability} not in (0, 1)")
        for name in names if names is not None else list(self.hosts):
            host = self.hosts[name]
            before = self._chain_drops(name)
            host.iptables("-F", "IWF-LOSS")
            self._keep_drops(name, before)
            p = f"{probability:.4f}"
            host.iptables(
                "-A", "IWF-LOSS", "-m", "statistic", "--mode", "random", "--probability", p,
                "-j", "DROP",
            )  # fmt: skip
            self._loss[name] = probability

    def lossless(self) -> None:
        for name in list(self._loss):
            before = self._chain_drops(name)
            self.hosts[name].iptables("-F", "IWF-LOSS", check=False)
            self._keep_drops(name, before)
        self._loss.clear()

    def heal_all(self) -> None:
        for a, b in list(self._cuts):
            self.heal(a, b)
        self.lossless()

    def dropped(self, name: str) -> int:
        """Packets the fault rules of host `name` have dropped so far, those since deleted
        included (proof that the faults bit)."""
        return self._dropped.get(name, 0) + self._chain_drops(name)

    def _keep_drops(self, name: str, before: int) -> None:
        self._dropped[name] = self._dropped.get(name, 0) + before - self._chain_drops(name)

    def _chain_drops(self, name: str) -> int:
        out = self.hosts[name].iptables("-L", "-v", "-n", "-x", check=False).stdout
        total = 0
        for line in out.splitlines():
            cells = line.split()
            if len(cells) > 2 and cells[2] == "DROP" and cells[0].isdigit():
                total += int(cells[0])
        return total

    def close(self) -> None:
        """Kill what still runs inside the hosts, then delete every namespace."""
        for host in list(self.hosts.values()):
            _kill_inside(host.ns)
            _run(["ip", "netns", "del", host.ns], check=False)
        self.hosts.clear()
        _run(["ip", "netns", "del", self.bridge_ns], check=False)
