"""Network namespaces, veth pairs and processes for one benchmark run, torn down on exit.

Every namespace and interface name carries a random tag, so concurrent test runs on
the same machine never collide, and `close()` removes everything that was created,
killing any process still left in the namespaces.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
C_PROGRAMS = ("mcsend", "mcrecv", "relay")


class LabError(RuntimeError):
    """A setup step failed; the message says which one and why."""


def build_helpers(dest: Path) -> dict[str, Path]:
    """Compile the C helpers with gcc -O2 into dest (a temp dir: no binaries in the repo)."""
    bins = {}
    for name in C_PROGRAMS:
        out = dest / name
        run(["gcc", "-O2", "-Wall", "-o", str(out), str(HERE / f"{name}.c")], timeout=120)
        bins[name] = out
    return bins


def run(argv: list[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


class Lab:
    """Namespaces `mcmwb-TAG-*`, their veths and processes, plus a scratch directory."""

    def __init__(self, nice: int = 0, pin: bool = False) -> None:
        self.nice = nice  # niceness of every process the benchmark starts
        # With pin, every process of a namespace runs on that namespace's CPU: each site
        # gets a core of its own, as if on its own machine, and trials stop depending on
        # where the scheduler happened to put the forwarders.
        self.pin = pin and (os.cpu_count() or 1) >= 2
        self.cpus: dict[str, int] = {}
        self.tag = secrets.token_hex(3)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"mcmwb-{self.tag}-"))
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[Any]] = []

    # -- namespaces -----------------------------------------------------------------

    def ns(self, short: str, cpu: int | None = None) -> str:
        """Create namespace mcmwb-TAG-SHORT with loopback up; its processes run on `cpu`
        when the lab pins."""
        name = f"mcmwb-{self.tag}-{short}"
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        if self.pin and cpu is not None:
            self.cpus[name] = cpu
        self.exec(name, ["ip", "link", "set", "lo", "up"])
        return name

    def exec(self, ns: str, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *argv], check=check)

    def ifname(self, short: str) -> str:
        """A tagged interface name (<= 15 characters)."""
        name = f"mb{self.tag}{short}"
        assert len(name) <= 15, name
        return name

    def veth(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str) -> tuple[str, str]:
        """Join two namespaces with a veth pair carrying the given CIDR addresses."""
        dev_a, dev_b = self.ifname("va"), self.ifname("vb")
        run(
            [
                "ip",
                "link",
                "add",
                dev_a,
                "netns",
                ns_a,
                "type",
                "veth",
                "peer",
                "name",
                dev_b,
                "netns",
                ns_b,
            ]
        )
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            self.exec(ns, ["ip", "addr", "add", addr, "dev", dev])
            self.exec(ns, ["ip", "link", "set", dev, "up"])
        return dev_a, dev_b

    def sysctl(self, ns: str, **values: str | int) -> None:
        """Set per-namespace sysctls (net.ipv4.conf.* etc.); keys use '.' as written."""
        args = [f"{k}={v}" for k, v in values.items()]
        self.exec(ns, ["sysctl", "-q", "-w", *args])

    # -- processes --------------------------------------------------------------------

    def popen(
        self,
        ns: str,
        argv: list[str],
        stdout: int | IO[Any] = subprocess.PIPE,
        stderr: int | IO[Any] = subprocess.PIPE,
        **kw: Any,
    ) -> subprocess.Popen[Any]:
        """Start argv in ns (see `argv`)."""
        proc = subprocess.Popen(self.argv(ns, argv), stdout=stdout, stderr=stderr, text=True, **kw)
        self.processes.append(proc)
        return proc

    def argv(self, ns: str, argv: list[str]) -> list[str]:
        """The command line that runs argv in ns at the lab's niceness and CPU (`ip netns
        exec`, `nice` and `taskset` all exec in place: the PID is the program's own)."""
        nice = ["nice", "-n", str(self.nice)] if self.nice else []
        cpu = ["taskset", "-c", str(self.cpus[ns])] if ns in self.cpus else []
        return ["ip", "netns", "exec", ns, *nice, *cpu, *argv]

    def start_ready(self, ns: str, argv: list[str], timeout: float = 10.0) -> subprocess.Popen[Any]:
        """Start a C helper and wait for its {"ready": true} line."""
        proc = self.popen(ns, argv)
        line = read_line(proc, timeout)
        if not line or not json.loads(line).get("ready"):
            stop(proc)
            err = proc.stderr.read() if proc.stderr else ""
            raise LabError(f"{argv[0]} in {ns} did not start: {err.strip() or line!r}")
        return proc

    def close(self) -> None:
        """Stop every process, kill leftovers in the namespaces, delete the namespaces."""
        for proc in self.processes:
            stop(proc)
        for name in reversed(self.namespaces):
            pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", name], check=False)
        self.namespaces.clear()
        self.processes.clear()
        subprocess.run(["rm", "-rf", str(self.workdir)], check=False)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    """One stdout line of proc, or '' if it exits or stays silent for `timeout` s."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline().strip()


def stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def link_stats(ns: str) -> dict[str, dict[str, int]]:
    """rx/tx packet and drop counters of every interface in ns."""
    out = run(["ip", "-n", ns, "-s", "-j", "link", "show"], check=False).stdout
    stats: dict[str, dict[str, int]] = {}
    for link in json.loads(out or "[]"):
        s = link.get("stats64", {})
        rx, tx = s.get("rx", {}), s.get("tx", {})
        stats[link["ifname"]] = {
            "rx_packets": rx.get("packets", 0),
            "rx_dropped": rx.get("dropped", 0),
            "tx_packets": tx.get("packets", 0),
            "tx_dropped": tx.get("dropped", 0),
        }
    return stats


def snmp_counters(ns: str) -> dict[str, int]:
    """The Udp and Ip drop counters of /proc/net/snmp as seen in ns."""
    text = run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], check=False).stdout
    wanted = {
        "Udp": ("InErrors", "RcvbufErrors", "SndbufErrors", "NoPorts"),
        "Ip": ("InDiscards", "InHdrErrors", "OutDiscards"),
    }
    lines = text.splitlines()
    counters: dict[str, int] = {}
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        proto, names = head.split(":", 1)
        _, nums = values.split(":", 1)
        for key, num in zip(names.split(), nums.split(), strict=False):
            if key in wanted.get(proto, ()):
                counters[f"{proto}.{key}"] = int(num)
    return counters


def wait_for(what: str, condition: Any, timeout: float, interval: float = 0.1) -> Any:
    """Poll condition() until truthy; raise LabError naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
