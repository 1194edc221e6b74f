"""Sites in network namespaces on this machine: the test bed of the demo, the tests and
the benchmark (tools/bench).

Every name carries a random tag so concurrent runs never collide, and `close()`
removes everything that was created, killing whatever still runs in the namespaces.
Traffic stays inside: namespaces are joined only by the veth pairs made here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcmw.control import query


class LabError(RuntimeError):
    """A setup step failed; the message says which one and why."""


class LabTimeout(LabError, TimeoutError):
    """`wait_for` gave up: a LabError for setup code, a TimeoutError for tests."""


def run(
    argv: list[str], check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll `condition` until it returns a truthy value; raise naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise LabTimeout(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def status_or_none(socket_path: str) -> dict[str, Any] | None:
    try:
        return query(socket_path, timeout=2.0)
    except OSError:
        return None


def stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    """One stdout line of proc (started with text=True), or '' if it exits or stays
    silent for `timeout` s."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return str(proc.stdout.readline()).strip()


class Lab:
    """Namespaces `PREFIX-TAG-*`, their veths and processes, and a scratch directory.

    `nice` runs every process started here at that niceness; with `pin`, the processes
    of a namespace created with a `cpu` run on that CPU only (the benchmark gives each
    site a core of its own, so trials stop depending on where the scheduler puts them).
    """

    def __init__(self, prefix: str = "mcmw", nice: int = 0, pin: bool = False) -> None:
        self.prefix = prefix
        self.nice = nice
        self.pin = pin and (os.cpu_count() or 1) >= 2
        self.cpus: dict[str, int] = {}  # namespace -> the CPU its processes run on
        self.tag = secrets.token_hex(3)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-{self.tag}-"))
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[Any]] = []
        self._links = 0

    def ns(self, short: str, cpu: int | None = None) -> str:
        """Create namespace PREFIX-TAG-SHORT with loopback up; return its name. Its
        processes run on `cpu` when the lab pins."""
        name = f"{self.prefix}-{self.tag}-{short}"
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        if self.pin and cpu is not None:
            self.cpus[name] = cpu
        self.exec(name, ["ip", "link", "set", "lo", "up"])
        return name

    def ifname(self, short: str) -> str:
        """A tagged interface name (at most 15 characters)."""
        name = f"i{self.tag}{short}"
        if len(name) > 15:
            raise LabError(f"interface name {name} is longer than 15 characters")
        return name

    def sysctl(self, ns: str, **values: str | int) -> None:
        """Set sysctls of `ns` (net.ipv4.conf.* and the like); keys as written, with '.'."""
        self.exec(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])

    def exec(
        self, ns: str, argv: list[str], check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *argv], check=check)

    def veth(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str) -> tuple[str, str]:
        """Join two namespaces with a veth pair carrying the given CIDR addresses."""
        self._links += 1
        dev_a, dev_b = f"v{self.tag}{self._links}a", f"v{self.tag}{self._links}b"
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

    def argv(self, ns: str, argv: list[str]) -> list[str]:
        """The command line that runs argv in ns at the lab's niceness and CPU (`ip netns
        exec`, `nice` and `taskset` all exec in place: the PID is the program's own)."""
        nice = ["nice", "-n", str(self.nice)] if self.nice else []
        cpu = ["taskset", "-c", str(self.cpus[ns])] if ns in self.cpus else []
        return ["ip", "netns", "exec", ns, *nice, *cpu, *argv]

    def popen(self, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(ns, argv), **kw)
        self.processes.append(proc)
        return proc

    def start_ready(self, ns: str, argv: list[str], timeout: float = 10.0) -> subprocess.Popen[Any]:
        """Start a helper that prints {"ready": true} once it is set up, and wait for it."""
        proc = self.popen(ns, argv, text=True)
        line = read_line(proc, timeout)
        try:
            ready = bool(json.loads(line).get("ready")) if line else False
        except (ValueError, AttributeError):
            ready = False
        if not ready:
            stop(proc)
            err = proc.stderr.read() if proc.stderr else ""
            raise LabError(f"{argv[0]} in {ns} did not start: {err.strip() or line!r}")
        return proc

    def python(self, ns: str, code: str, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        """Run a Python snippet inside `ns` with this interpreter."""
        return self.popen(ns, [sys.executable, "-c", code, *args], **kw)

    def start_node(
        self,
        ns: str,
        tree: Path,
        node: str,
        command: list[str] | None = None,
        cwd: Path | str | None = None,
    ) -> tuple[subprocess.Popen[Any], str]:
        """Start `mcmw run` for `node` in `ns`; return the process and its control socket,
        once the socket answers. `command` runs mcmw (default: this interpreter's
        `-m mcmw`), from `cwd` (default: ours)."""
        sock = str(self.workdir / f"{node}.sock")
        log = open(self.workdir / f"{node}.log", "w")  # noqa: SIM115 - owned by the process
        proc = self.popen(
            ns,
            [
                *(command or [sys.executable, "-m", "mcmw"]),
                "run",
                "-c",
                str(tree),
                "--node",
                node,
                "--socket",
                sock,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
        log.close()

        def ready() -> bool:
            if proc.poll() is not None:
                raise LabError(f"node {node} exited {proc.returncode}: {self.node_log(node)}")
            return status_or_none(sock) is not None

        wait_for(ready, 15, f"node {node} to answer on {sock}")
        return proc, sock

    def node_log(self, node: str) -> str:
        path = self.workdir / f"{node}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for name in reversed(self.namespaces):
            for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", name], check=False)
        self.namespaces.clear()
        self.processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
