"""`mcmw run`: the asyncio shell around the node core. It only moves bytes and time.

One event loop (uvloop) serves the TAP, the peer sockets, the control socket and a
timer tick. Every event ends in `flush`, which writes what the core queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import signal
import socket
import struct
import sys
import time
from pathlib import Path

import uvloop

from mcmw.config import ConfigError, TreeConfig, load_tree
from mcmw.control import ControlServer
from mcmw.node import Node
from overlay.link import CLOSED, PeerLink
from tap.device import TapDevice, TapError

log = logging.getLogger("mcmw")

TICK = 0.05  # timer resolution, seconds
TAP_BATCH = 256  # frames read per wake-up before others get a turn
# Adaptive read moderation on the TAP. Each wake-up of the loop costs far more than the
# frames it moves (epoll, the callback, the read that ends in EAGAIN, one send, and on the
# peer one recv): at a moderate rate a wake-up finds one or two frames and that cost is
# paid per packet. So after a wake-up that found fewer than SMALL_BATCH frames, the TAP is
# not watched for MODERATION seconds; the next wake-up then carries ~rate x MODERATION
# frames, and the peer's wake-ups as many. At high rates batches reach SMALL_BATCH and
# reading goes on at once, so the peak rate is kept (the TAP queue, 1000 frames, is not
# at risk while rate x MODERATION stays under it). The price is at most MODERATION (plus
# the loop's timer slack, about 1 ms) of added latency at the node that reads the frame;
# see docs/performance.md. 1 ms is libuv's timer resolution, and nothing for media.
MODERATION = 0.001  # seconds
SMALL_BATCH = 32  # frames
RECV_SIZE = 256 * 1024  # room for a coalesced UDP_GRO train
# What one read of a peer's stream takes, and so what one event handles before others
# (the control socket, the TAP, other links) get a turn: 45 data messages of a video
# stream, or some 2 300 Add-Routes of a flooding peer (about 0.2 s of work).
STREAM_READ = 64 * 1024
# UDP segmentation offload (Linux >= 4.18, socket options from <linux/udp.h>, not all in
# Python's socket module): datagrams of one size for one peer leave in one sendmsg with
# UDP_SEGMENT and cross the stack as one packet until the device (or the receiving
# socket) splits them; a receiver with UDP_GRO gets such a train in one recvmsg, with the
# segment size in a control message. Both ends stay plain UDP on the wire: a peer without
# GRO receives the datagrams one by one, as sent without GSO.
UDP_SEGMENT, UDP_GRO = 103, 104
GSO_SEGMENTS = 64  # UDP_MAX_SEGMENTS before Linux 6.9; later kernels allow 128
GSO_BYTES = 65000  # one train must fit an IP packet of 65535 bytes with its headers
GSO_REFUSED = (errno.EINVAL, errno.EIO, errno.EMSGSIZE, errno.EOPNOTSUPP, errno.ENOPROTOOPT)
GRO_SPACE = socket.CMSG_SPACE(4)  # the UDP_GRO control message carries an int
SOCKET_BUFFER = 4 * 1024 * 1024
# From <asm-generic/socket.h>, not in Python's socket module: as root, a buffer beyond
# net.core.rmem_max / wmem_max (Debian's default, 208 KiB, holds 1.5 ms of a 100 000 pps
# stream: a pause of the node longer than that would lose datagrams).
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0


_small_buffers_told: set[tuple[str, str]] = set()


def big_buffers(sock: socket.socket, kind: str) -> None:
    """SOCKET_BUFFER bytes to send and to receive on `sock`: as root whatever the limits
    (SO_*BUFFORCE), otherwise as much as net.core.wmem_max / rmem_max allow, with one
    warning per kind of socket when that is less."""
    for force, plain, sysctl in (
        (SO_SNDBUFFORCE, socket.SO_SNDBUF, "wmem_max"),
        (SO_RCVBUFFORCE, socket.SO_RCVBUF, "rmem_max"),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            continue
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        got = sock.getsockopt(socket.SOL_SOCKET, plain) // 2  # the kernel reports double
        if got < SOCKET_BUFFER and (kind, sysctl) not in _small_buffers_told:
            _small_buffers_told.add((kind, sysctl))
            log.warning(
                "%s socket buffer %d KiB, not the %d KiB asked for: without root, "
                "net.core.%s caps it (a burst longer than it holds is dropped)",
                kind,
                got // 1024,
                SOCKET_BUFFER // 1024,
                sysctl,
            )


class Connection:
    """A peer socket and the link state it carries."""

    def __init__(self, sock: socket.socket, link: PeerLink) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.link = link
        self.writing = False
        self.out = memoryview(b"")  # taken from the link, not yet accepted by the socket
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.was_up = False


class Runtime:
    def __init__(self, tree: TreeConfig, name: str, socket_path: str) -> None:
        self.tree = tree
        self.name = name
        self.socket_path = socket_path
        self.loop = asyncio.get_running_loop()
        self.node = Node(tree, name, time.monotonic())
        tap_cfg = tree.nodes[name].tap
        self.tap = TapDevice(
            tap_cfg.name, tap_cfg.address, tap_cfg.mtu, tap_cfg.ipv6_scopes, bridge=tap_cfg.bridge
        )
        self.conns: list[Connection] = []
        self.listener: socket.socket | None = None
        self.udp: socket.socket | None = None
        self.gso = False  # whether the UDP socket takes UDP_SEGMENT
        self.no_gso: set[tuple[str, int]] = set()  # peers whose path refused a train
        # One receive buffer for every read: received bytes are copied out at once, so a
        # read costs no allocation of RECV_SIZE (which Python's recv would make per call).
        self.rx_buffer = bytearray(RECV_SIZE)
        self.rx_view = memoryview(self.rx_buffer)
        self.stopping = asyncio.Event()
        self.dialers: dict[str, asyncio.Task[None]] = {}
        self.tap_paused: asyncio.TimerHandle | None = None  # read moderation under way
        self.control = ControlServer(socket_path, self.status)

    # -- setup and teardown -------------------------------------------------------

    async def run(self) -> int:
        loop = self.loop
        self.tap.open()
        try:
            self._listen()
            self._open_udp()
            await self.control.start()
            loop.add_reader(self.tap.fd, self._tap_readable)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stopping.set)
            loop.add_signal_handler(signal.SIGHUP, self._reload)
            self.node.start(time.monotonic())
            self._flush()
            self._start_dialers()
            ticker = asyncio.create_task(self._tick())
            log.info(
                "node %s up: tap %s %s, peers %s",
                self.name,
                self.tap.name,
                self.tap.address,
                ", ".join(self.node.neighbours) or "none",
            )
            await self.stopping.wait()
            ticker.cancel()
            await self._shutdown()
        finally:
            if self.tap_paused is not None:
                self.tap_paused.cancel()
            loop.remove_reader(self.tap.fd)
            self.tap.close()
            await self.control.stop()
            for sock in (self.listener, self.udp):
                if sock is not None:
                    loop.remove_reader(sock.fileno())
                    sock.close()
        log.info("node %s stopped", self.name)
        return 0

    def _listen(self) -> None:
        host, port = self.tree.nodes[self.name].listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
        sock.listen(16)
        sock.setblocking(False)
        self.listener = sock
        self.loop.add_reader(sock.fileno(), self._accept)

    def _open_udp(self) -> None:
        """The UDP data channel, when this node announces one."""
        port = self.tree.nodes[self.name].udp
        if not port:
            return
        # Bound to every address: peers send to whatever address their TCP link reaches us
        # at, and our datagrams leave from the address routing picks, as TCP's do.
        family = socket.AF_INET6 if ":" in self.tree.nodes[self.name].listen[0] else socket.AF_INET
        host = "::" if family == socket.AF_INET6 else "0.0.0.0"
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot bind UDP {host}:{port}: {exc.strerror}") from None
        big_buffers(sock, "UDP")
        # Probe for segmentation offload with a harmless value (0: no default segment
        # size): a kernel without it refuses the option, where it would silently ignore
        # the control message and send a whole train as one datagram.
        try:
            sock.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 0)
            self.gso = True
        except OSError:
            log.info("UDP segmentation offload not available: one datagram per send")
        with contextlib.suppress(OSError):  # Linux >= 5.0; without it, one per recvmsg
            sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
        sock.setblocking(False)
        self.udp = sock
        self.loop.add_reader(sock.fileno(), self._udp_readable)

    async def _shutdown(self) -> None:
        for task in self.dialers.values():
            task.cancel()
        self.node.shutdown(time.monotonic())
        self._flush()
        deadline = time.monotonic() + 1.0
        while any(c.out or c.link.has_output for c in self.conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.conns):
            self._drop(conn)

    def _start_dialers(self) -> None:
        """One dialing task per neighbour this node dials; none for links it no longer has."""
        wanted = {peer for peer, dials in self.node.neighbours.items() if dials}
        for peer in list(self.dialers):
            if peer not in wanted:
                self.dialers.pop(peer).cancel()
        for peer in wanted - set(self.dialers):
            self.dialers[peer] = asyncio.create_task(self._dial(peer))

    def _reload(self) -> None:
        """SIGHUP: re-read the tree file; add and remove links, disturb nothing else."""
        try:
            tree = load_tree(self.tree.path)
            ignored = self.node.reconfigure(tree, time.monotonic())
        except (ConfigError, ValueError) as exc:
            log.error("reload refused, keeping the running tree: %s", exc)
            return
        self.tree = tree
        self._start_dialers()
        self._flush()
        for what in ignored:
            log.warning("reload: not applied: %s", what)
        log.info("reloaded %s: peers now %s", tree.path, ", ".join(self.node.neighbours) or "none")

    # -- events -------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.node.expire(time.monotonic())
            self._flush()

    def _tap_readable(self) -> None:
        frames = self.tap.read_batch(TAP_BATCH)
        if frames:
            self.node.tap_frames(frames, time.monotonic())
            self._flush()
            if len(frames) < SMALL_BATCH:
                # A small batch: let frames gather for a while (read moderation, above).
                self.loop.remove_reader(self.tap.fd)
                self.tap_paused = self.loop.call_later(MODERATION, self._tap_resume)

    def _tap_resume(self) -> None:
        self.tap_paused = None
        if self.tap.fd >= 0:  # not closed while paused
            self.loop.add_reader(self.tap.fd, self._tap_readable)

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            self._register(sock, self.node.new_link(None, time.monotonic(), address[0]))
            self._flush()

    async def _dial(self, peer: str) -> None:
        delay, failing = BACKOFF_MIN, False
        while True:
            # Read each time: a reload may have given the neighbour a new address.
            host, port = self.tree.nodes[peer].listen
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(self.loop.sock_connect(sock, (host, port)), 5.0)
            except (OSError, TimeoutError) as exc:
                sock.close()
                if isinstance(exc, TimeoutError):
                    reason = "timed out"
                else:  # uvloop's strerror is "Connect call failed (ADDRESS)": name the errno
                    reason = os.strerror(exc.errno) if exc.errno else str(exc)
                self.node.dial_failed(peer, f"{host}:{port}", reason)
                # Once per run of failures: a neighbour that is down is not news every retry.
                log.log(
                    logging.DEBUG if failing else logging.WARNING,
                    "cannot connect to %s at %s:%d: %s (retrying)",
                    peer,
                    host,
                    port,
                    reason,
                )
                failing = True
            else:
                failing = False
                conn = self._register(sock, self.node.new_link(peer, time.monotonic(), host))
                self._flush()
                await conn.done
                if conn.was_up:
                    delay = BACKOFF_MIN
            # Exponential backoff with jitter, so restarted peers are not hit in step.
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, BACKOFF_MAX)

    def _register(self, sock: socket.socket, link: PeerLink) -> Connection:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        big_buffers(sock, "TCP")
        conn = Connection(sock, link)
        self.conns.append(conn)
        self.loop.add_reader(conn.fd, self._readable, conn)
        return conn

    def _readable(self, conn: Connection) -> None:
        try:
            size = conn.sock.recv_into(self.rx_buffer, STREAM_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(conn, exc.strerror or str(exc))
            return
        if not size:
            self._lost(conn, "connection closed by peer")
            return
        self.node.link_data(conn.link, self.rx_view[:size], time.monotonic())
        if conn.link.up:
            conn.was_up = True
        self._flush()

    def _writable(self, conn: Connection) -> None:
        self._send(conn)

    def _lost(self, conn: Connection, reason: str) -> None:
        self.node.link_lost(conn.link, reason, time.monotonic())
        self._drop(conn)
        self._flush()

    def _drop(self, conn: Connection) -> None:
        if conn not in self.conns:
            return
        self.conns.remove(conn)
        self.loop.remove_reader(conn.fd)
        if conn.writing:
            self.loop.remove_writer(conn.fd)
        conn.sock.close()
        if not conn.done.done():
            conn.done.set_result(True)

    # -- output -------------------------------------------------------------------

    def _udp_readable(self) -> None:
        assert self.udp is not None
        node, peers, view = self.node, self.node.udp_peers, self.rx_view
        recvmsg_into, buffers = self.udp.recvmsg_into, [self.rx_buffer]
        now = time.monotonic()
        for _ in range(TAP_BATCH):
            try:
                size, ancillary, flags, address = recvmsg_into(buffers, GRO_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error for an earlier datagram; nothing to do
            # A coalesced train (UDP_GRO): datagrams of `segment` bytes, the last maybe shorter.
            segment = size or 1
            for level, kind, data in ancillary:
                if level == socket.SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                    segment = int.from_bytes(data[:4], sys.byteorder) or segment
            link = peers.get((address[0], address[1]))
            if link is None:
                node.counters["dropped_unknown_sender"] += -(-size // segment) or 1
            elif flags & socket.MSG_TRUNC:
                node.counters["dropped_malformed"] += 1
            else:  # views of the buffer (link_datagrams copies what it keeps); an empty
                # datagram is one empty view, counted malformed
                node.link_datagrams(
                    link,
                    [view[start : min(start + segment, size)] for start in range(0, size or 1, segment)],
                    now,
                )
        self._flush()

    def _flush(self) -> None:
        node = self.node
        if node.tap_out:
            dropped = self.tap.write_frames(node.tap_out)
            node.tap_tx += len(node.tap_out) - dropped
            if dropped:
                node.counters["dropped_tap"] += dropped
            node.tap_out.clear()
        for conn in list(self.conns):
            link = conn.link
            if link.datagrams:
                self._send_datagrams(link)
            if (conn.out or link.has_output) and not conn.writing:
                self._send(conn)
            elif link.state == CLOSED and not conn.out and not link.has_output:
                self._drop(conn)

    def _send_datagrams(self, link: PeerLink) -> None:
        datagrams = link.datagrams
        if self.udp is None or link.address is None:
            datagrams.clear()
            return
        udp, destination = self.udp, (link.address, link.udp_port)
        gso = self.gso and destination not in self.no_gso
        index, count = 0, len(datagrams)
        while index < count:
            # A train: the datagrams from `index` on of one size, and a shorter one may end
            # it; equal-size datagrams are the rule for a constant-bitrate stream.
            size = len(datagrams[index])
            end = index + 1
            if gso:
                limit = min(count, index + min(GSO_SEGMENTS, GSO_BYTES // size))
                while end < limit and len(datagrams[end]) == size:
                    end += 1
                if end < limit and len(datagrams[end]) < size:
                    end += 1
            try:
                if end - index > 1:
                    segment = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
                    udp.sendmsg(datagrams[index:end], segment, 0, destination)
                else:
                    udp.sendto(datagrams[index], destination)
            except (BlockingIOError, InterruptedError):
                # The socket buffer is full: what is left is dropped, and counted.
                dropped = count - index
                link.dropped_queue += dropped
                self.node.counters["dropped_queue"] += dropped
                break
            except OSError as exc:
                if end - index > 1 and exc.errno in GSO_REFUSED:
                    # The path to this peer cannot take trains (an MTU below the segment,
                    # IPsec, a device without checksum offload on older kernels): send it
                    # one datagram at a time from now on, starting with these.
                    log.info("UDP to %s:%d: one datagram per send (%s)", *destination[:2], exc.strerror)
                    self.no_gso.add(destination)
                    gso = False
                    continue
                # e.g. ECONNREFUSED from an earlier datagram's ICMP error, or no route
                self.node.counters["udp_send_errors"] += end - index
            index = end
        datagrams.clear()

    def _send(self, conn: Connection) -> None:
        """Write what the socket takes. The link's queue is taken only once the socket
        has accepted everything taken before: the output held here stays one bounded
        queue's worth, and a peer that reads slowly costs drops counted on its link, not
        memory that grows for as long as it stays slow."""
        link = conn.link
        while True:
            if not conn.out:
                if not link.has_output:
                    break
                conn.out = memoryview(link.take_output())
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    self._lost(conn, exc.strerror or str(exc))
                    return
                break
            conn.out = conn.out[sent:]
            if conn.out:
                break  # the socket is full
        if conn.out and not conn.writing:
            conn.writing = True
            self.loop.add_writer(conn.fd, self._writable, conn)
        elif not conn.out:
            if conn.writing:
                conn.writing = False
                self.loop.remove_writer(conn.fd)
            if link.state == CLOSED:
                self._drop(conn)

    def status(self) -> dict[str, object]:
        return self.node.status(time.monotonic())


def run_node(config: str, name: str, socket_path: str, verbose: bool) -> int:
    """`mcmw run`: load the tree and serve until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"mcmw[{name}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    tree = load_tree(config)
    for warning in tree.warnings:
        log.warning("%s", warning)
    if name not in tree.nodes:
        raise ConfigError(f"{config}: nodes: no node named {name!r} (have {', '.join(tree.nodes)})")
    Path(socket_path).parent.mkdir(parents=True, exist_ok=True)

    async def main() -> int:
        return await Runtime(tree, name, socket_path).run()

    try:
        return uvloop.run(main())
    except TapError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        return 1
