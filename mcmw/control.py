"""The control socket: a running node answers `status` on a UNIX socket with JSON."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

MAX_REQUEST = 1024


class ControlServer:
    """Serves one JSON document per request line (`status`)."""

    def __init__(self, path: str, status: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.status = status
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if _is_socket(self.path):
            if _answers(self.path):
                raise OSError(f"another node is already serving {self.path}")
            os.unlink(self.path)  # left behind by a node that did not stop cleanly
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        os.chmod(self.path, 0o660)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            request = line[:MAX_REQUEST].decode(errors="replace").strip()
            if request == "status":
                reply: dict[str, Any] = self.status()
            else:
                reply = {"error": f"unknown request {request!r} (try 'status')"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _answers(path: str) -> bool:
    try:
        query(path, timeout=1.0)
        return True
    except OSError:
        return False


def query(path: str, request: str = "status", timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running node; OSError when nobody answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise OSError(f"{path}: the node's answer is not JSON") from None


def show_status(path: str, as_json: bool) -> int:
    """`mcmw status`: print a node's status; exit 1 when no node answers."""
    from mcmw.status import format_status

    try:
        status = query(path)
    except FileNotFoundError:
        raise OSError(f"no node at {path} (is mcmw run going?)") from None
    except OSError as exc:
        raise OSError(f"{path}: {exc.strerror or exc}") from None
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0
