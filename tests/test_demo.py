"""`mcmw demo` as a user runs it: a subprocess, its output, and nothing left behind."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.netlab import require_privileged

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).resolve().parent.parent
DEMO = [sys.executable, "-m", "mcmw", "demo"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def require_demo_tools() -> None:
    require_privileged()
    missing = [tool for tool in ("ffmpeg", "ffprobe") if not shutil.which(tool)]
    if missing:
        if os.environ.get("MCMW_REQUIRE_PRIVILEGED") == "1":
            pytest.fail(f"MCMW_REQUIRE_PRIVILEGED=1 but {', '.join(missing)} missing")
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup.sh installs ffmpeg)")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def demo_traces(output: str) -> tuple[set[str], Path | None]:
    """The namespaces and the workdir this run of the demo announced (its random tag keeps
    them apart from any other run on the machine)."""
    names = set(re.findall(r"in namespace (\S+)", output))
    workdir = re.search(r"^workdir (\S+)", output, re.MULTILINE)
    return names, Path(workdir.group(1)) if workdir else None


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def assert_nothing_left(output: str) -> None:
    names, workdir = demo_traces(output)
    assert names, f"the demo did not name its namespaces:\n{output}"
    assert workdir is not None, output
    # Namespace deletion is synchronous; processes reaped by the demo are gone already.
    assert not names & namespaces(), f"namespaces left behind: {sorted(names & namespaces())}"
    assert not workdir.exists(), f"workdir left behind: {workdir}"
    assert not processes_mentioning(str(workdir)), processes_mentioning(str(workdir))


def stop(proc: subprocess.Popen[str]) -> None:
    """After a failed assertion: let a still-running demo clean up (SIGTERM) before killing it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_demo_streams_video_to_both_receivers_and_cleans_up() -> None:
    require_demo_tools()
    proc = subprocess.Popen(
        [*DEMO, "--duration", "8"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        stop(proc)
    output = stdout + stderr
    assert proc.returncode == 0, output
    assert "mcmw demo: OK: both receivers got a decodable stream" in stdout
    assert "overlay up: studio <-> east <-> west" in stdout
    for site in ("east", "west"):
        match = re.search(
            rf"^  {site}\s+delivered (\d+) packets.*ffprobe: mpegts mpeg2video 640x360, "
            rf"(\d+) frames decoded",
            stdout,
            re.MULTILINE,
        )
        assert match, f"no ffprobe result for {site}:\n{output}"
        delivered, frames = int(match.group(1)), int(match.group(2))
        assert delivered > 0
        assert frames >= 8 * 25 // 2, f"{site} decoded only {frames} frames"
    assert_nothing_left(output)


class Reader:
    """Lines of a child's stdout, readable with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self.thread.start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"no line starting {prefix!r}:\n{''.join(self.seen)}")
            self.seen.append(line)
            if line.startswith(prefix):
                return

    def rest(self) -> str:
        self.thread.join(timeout=10)
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)


@pytest.mark.parametrize(
    "moment",
    ["overlay up:", "sender:"],
    ids=["after-links-up", "while-streaming"],
)
def test_sigint_tears_everything_down(moment: str) -> None:
    require_demo_tools()
    proc = subprocess.Popen(
        [*DEMO, "--duration", "60"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reader = Reader(proc)
    try:
        reader.wait_for(moment, timeout=60)
        if moment == "sender:":
            time.sleep(2)  # into the stream: ffmpegs running, packets in flight
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=20)
        took = time.monotonic() - sent
    finally:
        stop(proc)
    output = reader.rest()
    assert returncode == 1, output
    assert "interrupted (SIGINT), cleaning up" in output
    assert took < 12, f"the demo took {took:.1f}s to stop"
    assert_nothing_left(output)
