"""Run mcmw with adaptive TAP read moderation patched in: the proposal measured in
docs/performance.md, runnable until (or unless) mcmw adopts it.

    sudo .venv/bin/python tools/bench/run.py --modes c-relay,mcmw \\
        --mcmw ".venv/bin/python tools/bench/moderated.py"

It behaves as `python -m mcmw` except in `Runtime._tap_readable`: after a wake-up that
found only a few frames (a moderate rate), it stops watching the TAP for MODERATION
seconds, so the next wake-up carries ~rate x MODERATION frames and the per-wake-up cost
(epoll, callback, the empty read that ends a batch, one send, on the peer one recv) is
shared by them. A large batch (a high rate) is followed by reading on at once, so the
peak rate is kept; the price is up to MODERATION of added latency at node a.

It patches private methods of mcmw/runtime.py and tap/device.py as they are at the time
of writing: when those change, this file may need to follow, or be deleted.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from mcmw import runtime  # noqa: E402
from mcmw.cli import main  # noqa: E402

MODERATION = 0.001  # seconds; libuv timers have millisecond resolution
SMALL_BATCH = 32  # frames; below this a wake-up was mostly overhead


def _tap_readable(self: runtime.Runtime) -> None:
    frames = self.tap.read_batch(runtime.TAP_BATCH)
    if frames:
        self.node.tap_frames(frames, time.monotonic())
        self._flush()
    if 0 < len(frames) < SMALL_BATCH:
        fd = self.tap.fd
        self.loop.remove_reader(fd)
        self.loop.call_later(MODERATION, _resume, self, fd)


def _resume(self: runtime.Runtime, fd: int) -> None:
    # The TAP may have been closed while reading was paused (shutdown).
    if self.tap.fd == fd and not self.stopping.is_set():
        self.loop.add_reader(fd, self._tap_readable)


if __name__ == "__main__":
    runtime.Runtime._tap_readable = _tap_readable  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
