"""`mcmw demo`: three sites in network namespaces, a live video stream carried end to end.

studio -- east -- west, a line, so east both delivers the stream to its own receiver and
relays it to west. ffmpeg in studio sends MPEG-TS to 239.1.1.1; ffmpeg in east and west
joins the group (plain IGMP on the TAP) and records what arrives; ffprobe then decodes
both recordings. Everything lives in namespaces joined by veths and is removed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

from mcmw.lab import Lab, LabError, run, status_or_none, wait_for

GROUP = "239.1.1.1"
PORT = 5004
FPS = 25
SITES = ("studio", "east", "west")
LINKS = (("studio", "east"), ("east", "west"))  # first dials, second accepts
RECEIVERS = ("east", "west")
SENDER = "studio"
MIN_DURATION = 3.0
RECEIVER_IDLE_S = 4.0  # a receiving ffmpeg ends after this long without a packet
MIN_SHARE = 0.5  # a receiver passes with at least this share of the frames studio sent


class Interrupted(Exception):
    """SIGINT or SIGTERM: unwind through the `finally` that tears the lab down."""


@dataclass
class Site:
    name: str
    ns: str = ""
    socket: str = ""
    procs: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)


def say(text: str = "", out: TextIO = sys.stdout) -> None:
    print(text, file=out, flush=True)


# -- checks -------------------------------------------------------------------------


def missing_requirement() -> str | None:
    """Why the demo cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (it creates network namespaces and TAP devices)"
    for tool, package in (("ip", "iproute2"), ("ffmpeg", "ffmpeg"), ("ffprobe", "ffmpeg")):
        if not shutil.which(tool):
            origin = "" if tool == package else f" from {package}"
            return f"needs {tool}{origin} (run scripts/setup.sh)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (load the tun module, or give the container the device)"
    try:
        encoders = run(["ffmpeg", "-hide_banner", "-encoders"], timeout=10).stdout
    except (LabError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run ffmpeg: {exc}"
    for codec in ("mpeg2video", "mp2"):
        if f" {codec} " not in encoders:
            return f"needs an ffmpeg with the {codec} encoder (run scripts/setup.sh)"
    return None


# -- building the sites ---------------------------------------------------------------


def tree_document() -> dict[str, Any]:
    nodes: dict[str, Any] = {}
    for index, name in enumerate(SITES, start=1):
        nodes[name] = {
            # Each node listens on its address of the first veth it has; acceptors are dialed
            # there (studio dials east on 198.18.1.2, east dials west on 198.18.2.2).
            "listen": f"198.18.{max(1, index - 1)}.{1 if index == 1 else 2}:7000",
            "tap": {"name": "mcmw0", "address": f"169.254.1.{index}/16"},
            "igmp": {"version": 3},
        }
    return {
        "overlay": {"address_bits": 24, "mapping": "modulo"},
        "nodes": nodes,
        "links": [list(link) for link in LINKS],
    }


def build_sites(lab: Lab) -> tuple[dict[str, Site], Path]:
    sites = {name: Site(name, ns=lab.ns(name)) for name in SITES}
    for index, (dialer, acceptor) in enumerate(LINKS, start=1):
        lab.veth(sites[dialer].ns, f"198.18.{index}.1/24", sites[acceptor].ns, f"198.18.{index}.2/24")
    tree = lab.workdir / "tree.yaml"
    text = yaml.safe_dump(tree_document(), sort_keys=False, default_flow_style=None)
    tree.write_text(text)
    say(f"tree file {tree}:")
    for line in text.splitlines():
        say(f"  | {line}")
    # Acceptors first, so the dialers connect at their first attempt rather than after a backoff.
    for name in reversed(SITES):
        proc, sock = lab.start_node(sites[name].ns, tree, name)
        sites[name].procs["mcmw"], sites[name].socket = proc, sock
        say(f"started mcmw run --node {name} in namespace {sites[name].ns}")
    return sites, tree


def status(site: Site) -> dict[str, Any]:
    doc = status_or_none(site.socket)
    if doc is None:
        raise LabError(f"node {site.name} stopped answering on {site.socket}")
    return doc


def group_entry(doc: dict[str, Any]) -> dict[str, Any] | None:
    return next((g for g in doc.get("groups", []) if g["group"] == GROUP), None)


def links_up(sites: dict[str, Site]) -> bool:
    return all(all(p["state"] == "up" for p in status(site)["peers"]) for site in sites.values())


def joins_seen(sites: dict[str, Site]) -> bool:
    """Each receiver's node saw the IGMP join, and the want reached every upstream hop."""
    for name in RECEIVERS:
        entry = group_entry(status(sites[name]))
        if entry is None or not entry.get("local"):
            return False
    for upstream, downstream in LINKS:
        entry = group_entry(status(sites[upstream]))
        if entry is None or downstream not in entry["peers"]:
            return False
    return True


# -- the applications -----------------------------------------------------------------


def ffmpeg_log(lab: Lab, name: str) -> Any:
    # ffmpeg writes to files, never to a pipe nobody reads (a full pipe would stall it).
    return open(lab.workdir / f"{name}.log", "w")  # noqa: SIM115 - handed to the process


def start_receiver(lab: Lab, site: Site) -> Path:
    out = lab.workdir / f"{site.name}.ts"
    # A large socket buffer and fifo ride out scheduling hiccups; `timeout` (microseconds)
    # ends the recording once the stream stops.
    options = f"fifo_size=1000000&overrun_nonfatal=1&buffer_size=4194304&timeout={int(RECEIVER_IDLE_S * 1e6)}"
    url = f"udp://{GROUP}:{PORT}?{options}"
    log = ffmpeg_log(lab, f"ffmpeg-{site.name}")
    site.procs["ffmpeg"] = lab.popen(
        site.ns,
        [
            "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "warning", "-y",
            # Short probing, so a short demo still records from the first packets on.
            "-analyzeduration", "2000000", "-probesize", "2000000",
            "-i", url, "-map", "0", "-c", "copy", "-f", "mpegts", str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )  # fmt: skip
    log.close()
    return out


def start_sender(lab: Lab, site: Site, duration: float) -> Path:
    progress = lab.workdir / "sender.progress"
    url = f"udp://{GROUP}:{PORT}?ttl=16&pkt_size=1316"
    log = ffmpeg_log(lab, "ffmpeg-studio")
    site.procs["ffmpeg"] = lab.popen(
        site.ns,
        [
            "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "warning", "-nostats",
            "-progress", str(progress), "-stats_period", "0.5",
            "-re", "-f", "lavfi", "-i", f"testsrc=size=640x360:rate={FPS}",
            "-re", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
            "-t", f"{duration:g}",
            "-c:v", "mpeg2video", "-b:v", "2M", "-g", str(FPS // 2),
            "-c:a", "mp2", "-b:a", "128k",
            "-f", "mpegts", url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )  # fmt: skip
    log.close()
    return progress


def read_progress(path: Path) -> dict[str, str]:
    """The last block of ffmpeg's -progress key=value output."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return values


def probe(path: Path) -> dict[str, Any]:
    """What ffprobe finds in a recording: video codec, frames decoded, duration, errors."""
    found: dict[str, Any] = {"bytes": path.stat().st_size if path.exists() else 0}
    if not found["bytes"]:
        found["error"] = "nothing was recorded"
        return found
    proc = run(
        [
            "ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
            "-show_entries", "stream=codec_name,width,height,nb_read_frames:format=format_name,duration",
            "-of", "json", str(path),
        ],
        check=False,
        timeout=60,
    )  # fmt: skip
    try:
        doc = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        doc = {}
    streams = doc.get("streams") or [{}]
    video, fmt = streams[0], doc.get("format", {})
    found.update(
        format=fmt.get("format_name"),
        duration=float(fmt.get("duration") or 0),
        codec=video.get("codec_name"),
        size=f"{video.get('width')}x{video.get('height')}" if video.get("width") else None,
        frames=int(video.get("nb_read_frames") or 0),
        errors=len(proc.stderr.splitlines()),
    )
    if proc.returncode != 0 and not found["frames"]:
        found["error"] = (proc.stderr.strip().splitlines() or ["ffprobe failed"])[-1]
    return found


# -- live display ---------------------------------------------------------------------


def node_line(name: str, doc: dict[str, Any] | None) -> str:
    if doc is None:
        return f"  {name:<7} (not answering)"
    peers = doc.get("peers", [])
    up = sum(p["state"] == "up" for p in peers)
    counters = doc.get("counters", {})
    drops = sum(v for k, v in counters.items() if k.startswith("dropped"))
    entry = group_entry(doc)
    if entry is None:
        route = "-"
    else:
        outs = (["tap"] if entry.get("local") else []) + list(entry["peers"])
        route = f"{GROUP}->{'+'.join(outs) or 'none'}"
    rtts = " ".join(
        f"{p['name']} {p['rtt_ms']:.2f}ms" if p.get("rtt_ms") is not None else f"{p['name']} -" for p in peers
    )
    tap = doc.get("tap", {})
    return (
        f"  {name:<7} peers {up}/{len(peers)}  groups {len(doc.get('groups', []))} "
        f"{route:<24} tap rx {tap.get('rx_frames', 0):>6} tx {tap.get('tx_frames', 0):>6}  "
        f"fwd {counters.get('forwarded', 0):>6}  dlv {counters.get('delivered', 0):>6}  "
        f"drops {drops}  rtt {rtts}"
    )


class Display:
    """Once a second, one line per node; redrawn in place on a terminal, appended otherwise."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0

    def show(self, lines: list[str]) -> None:
        if self.tty and self.drawn:
            self.out.write(f"\x1b[{self.drawn}F")  # back to the first line of the last frame
        for line in lines:
            self.out.write(("\x1b[2K" if self.tty else "") + line + "\n")
        self.out.flush()
        self.drawn = len(lines)


def stream(
    lab: Lab, sites: dict[str, Site], duration: float, progress: Path
) -> dict[str, dict[str, Any] | None]:
    """Show counters until the sender is done; return each node's last status."""
    sender = sites[SENDER].procs["ffmpeg"]
    display = Display()
    started = time.monotonic()
    deadline = started + duration + 20  # ffmpeg -re keeps time; this only bounds a stuck one
    last: dict[str, dict[str, Any] | None] = {}
    while True:
        done = sender.poll() is not None
        last = {name: status_or_none(site.socket) for name, site in sites.items()}
        sent = read_progress(progress)
        clock = "done" if done else f"{time.monotonic() - started:5.1f}s of {duration:g}s"
        head = (
            f" [{clock}]  studio ffmpeg sent {sent.get('frame', '0')} frames, "
            f"{int(sent.get('total_size', '0') or 0) // 1024} KiB"
        )
        display.show([head, *(node_line(name, doc) for name, doc in last.items())])
        if done:
            break
        if time.monotonic() > deadline:
            raise LabError(f"the studio ffmpeg was still sending {duration + 20:g}s after it started")
        time.sleep(1.0 - (time.monotonic() - started) % 1.0)
    if sender.returncode != 0:
        raise LabError(f"the studio ffmpeg failed (exit {sender.returncode}): {tail(lab, 'ffmpeg-studio')}")
    return last


def tail(lab: Lab, name: str) -> str:
    path = lab.workdir / f"{name}.log"
    lines = path.read_text().strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "(no output)"


def stop_receivers(sites: dict[str, Site]) -> None:
    """Let the recorders end on their own: after RECEIVER_IDLE_S of silence ffmpeg takes the
    UDP input as ended and closes a complete file. Signals are only the fallback, because
    an interrupted ffmpeg loses what it still buffers (seconds of stream)."""
    procs = [sites[name].procs["ffmpeg"] for name in RECEIVERS]
    say(f"stream over; the receivers finish their recordings after {RECEIVER_IDLE_S:g}s of silence")
    try:
        wait_all(procs, RECEIVER_IDLE_S + 5)
    except subprocess.TimeoutExpired:
        stop_ffmpeg(procs)


def stop_ffmpeg(procs: list[subprocess.Popen[Any]], timeout: float = 5.0) -> None:
    """Stop ffmpegs so they finish their files. The first SIGINT only asks ffmpeg to stop
    after its next packet; a receiver blocked on a silent UDP socket needs a second one,
    which interrupts the read (ffmpeg then still writes its trailer and flushes)."""
    running = [proc for proc in procs if proc.poll() is None]
    for attempt in range(2):
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        if attempt == 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                wait_all(running, 0.5)
    try:
        wait_all(running, timeout)
    except subprocess.TimeoutExpired:
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def wait_all(procs: list[subprocess.Popen[Any]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))


# -- the whole demo -------------------------------------------------------------------


def demo(lab: Lab, duration: float) -> int:
    say(
        f"mcmw demo: three sites in network namespaces, a line studio <-> east <-> west, "
        f"streaming {duration:g}s of video to {GROUP}"
    )
    say(f"workdir {lab.workdir} (removed when the demo ends)")
    sites, _ = build_sites(lab)
    wait_for(lambda: links_up(sites), 20, "every overlay link to come up")
    say("overlay up: studio <-> east <-> west (all links up)")

    recordings = {name: start_receiver(lab, sites[name]) for name in RECEIVERS}
    say(f"receivers: ffmpeg in east and west listening on udp://{GROUP}:{PORT}")

    def joined() -> bool:
        for name in RECEIVERS:
            proc = sites[name].procs["ffmpeg"]
            if proc.poll() is not None:
                raise LabError(f"the {name} ffmpeg exited early: {tail(lab, f'ffmpeg-{name}')}")
        return joins_seen(sites)

    wait_for(joined, 10, "the receivers' IGMP joins to reach studio", interval=0.1)
    say(f"joins seen: east and west want {GROUP}; studio forwards to east, east to west")

    progress = start_sender(lab, sites[SENDER], duration)
    say(f"sender: ffmpeg in studio, testsrc 640x360 {FPS} fps MPEG-2 + 440 Hz MP2 -> udp://{GROUP}:{PORT}")
    say()
    say(
        "live, once a second: peers up/known, groups known, where 239.1.1.1 goes "
        "(tap = local receivers), TAP frames in/out,"
    )
    say("  fwd = packets sent to peers, dlv = packets written into the TAP, drops, round-trip times")
    last = stream(lab, sites, duration, progress)
    stop_receivers(sites)
    final = {name: status_or_none(site.socket) or last.get(name) for name, site in sites.items()}
    return summarize(lab, final, recordings, progress)


def summarize(
    lab: Lab,
    final: dict[str, dict[str, Any] | None],
    recordings: dict[str, Path],
    progress: Path,
) -> int:
    sent = read_progress(progress)
    sent_frames = int(sent.get("frame", "0") or 0)
    sent_kib = int(sent.get("total_size", "0") or 0) // 1024
    say()
    say("summary")
    studio = final.get(SENDER) or {}
    say(
        f"  studio  ffmpeg sent {sent_frames} video frames ({sent_kib} KiB); its node read "
        f"{studio.get('tap', {}).get('rx_frames', '?')} frames from the TAP and forwarded "
        f"{studio.get('counters', {}).get('forwarded', '?')} packets to east"
    )
    failures: list[str] = []
    for name, path in recordings.items():
        doc = final.get(name) or {}
        counters = doc.get("counters", {})
        found = probe(path)
        line = (
            f"  {name:<7} delivered {counters.get('delivered', '?')} packets into its TAP, "
            f"recorded {found['bytes'] // 1024} KiB; "
        )
        if "error" in found:
            line += f"ffprobe: {found['error']}"
        else:
            line += (
                f"ffprobe: {found['format']} {found['codec']} {found['size']}, "
                f"{found['frames']} frames decoded ({found['duration']:.1f}s), "
                f"{found['errors']} decode errors"
            )
        say(line)
        if "error" in found:
            failures.append(f"{name}: {found['error']}")
        elif found["codec"] is None or found["frames"] == 0:
            failures.append(f"{name}: no decodable video in the recording")
        elif sent_frames and found["frames"] < MIN_SHARE * sent_frames:
            failures.append(f"{name}: only {found['frames']} of {sent_frames} frames arrived")
    # A healthy run logs nothing above INFO; anything else is worth showing to the user.
    for name in SITES:
        complaints = [line for line in lab.node_log(name).splitlines() if " INFO " not in line]
        for line in complaints[:3]:
            say(f"  {name} node log: {line}")
        if len(complaints) > 3:
            say(f"  {name} node log: ... and {len(complaints) - 3} more lines")
    if failures:
        say(f"mcmw demo: FAILED: {'; '.join(failures)}")
        return 1
    say("mcmw demo: OK: both receivers got a decodable stream")
    return 0


def _leftover_namespaces(lab: Lab) -> list[str]:
    listing = run(["ip", "netns", "list"], check=False).stdout.split("\n")
    mine = f"{lab.prefix}-{lab.tag}-"
    return [line.split()[0] for line in listing if line.startswith(mine)]


def teardown(lab: Lab) -> None:
    # ffmpeg first, gently: Lab.close's single SIGTERM would leave a waiting receiver
    # hanging until Lab's kill timeout.
    stop_ffmpeg([proc for proc in lab.processes if "ffmpeg" in list(proc.args)], timeout=2.0)
    lab.close()
    # A signal that landed between `ip netns add` and Lab recording the name leaves a
    # namespace Lab does not know about; the random tag makes it safe to sweep by name.
    for name in _leftover_namespaces(lab):
        for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run(["ip", "netns", "del", name], check=False)


def run_demo(duration: float) -> int:
    """`mcmw demo`: exit 0 when both receivers recorded a decodable stream, 1 otherwise."""
    if not duration >= MIN_DURATION:
        say(f"mcmw demo: --duration must be at least {MIN_DURATION:g} seconds", sys.stderr)
        return 2
    problem = missing_requirement()
    if problem is not None:
        say(f"mcmw demo: {problem}", sys.stderr)
        return 1

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    lab: Lab | None = None
    try:
        lab = Lab(prefix="mcmwdemo")
        return demo(lab, duration)
    except Interrupted as exc:
        say(f"\nmcmw demo: interrupted ({exc}), cleaning up", sys.stderr)
        return 1
    except (LabError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        say(f"mcmw demo: FAILED: {exc}", sys.stderr)
        if lab is not None:
            for name in SITES:
                log = lab.node_log(name).strip()
                if log:
                    say(f"  {name} node log, last line: {log.splitlines()[-1]}", sys.stderr)
        return 1
    finally:
        # Teardown must finish even if the user presses Ctrl-C again while it runs.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            if lab is not None:
                teardown(lab)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
