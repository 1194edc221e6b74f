"""Each forwarder's CPU per packet at one fixed rate: where a path spends its time.

    sudo .venv/bin/python tools/bench/nodes.py [--mode mcmw] [--rate 100000]
                                               [--seconds 3] [--trials 3] [--perf NAME]

Builds one path of run.py (any mode it knows), sends `--trials` trials at `--rate` and
prints per trial the loss and, per forwarding process, microseconds of CPU per packet
delivered, split into user and system time, and the sender's and receiver's own CPU per
packet. With `--perf NAME`, `perf record -g` follows every forwarder for all trials
(tools/bench/out/NAME-FORWARDER.data; read with `perf report -i FILE`). run.py gives the
totals beside the C relay and the kernel; this says which node, and which side of the
syscall boundary, a change moved.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from measure import run_trial
from modes import build_helpers, mode_path

from mcmw.lab import Lab

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="per-forwarder CPU per packet at a fixed rate")
    p.add_argument("--mode", default="mcmw", help="a mode of run.py (default %(default)s)")
    p.add_argument("--rate", type=float, default=100000, help="packets per second")
    p.add_argument("--seconds", type=float, default=3.0, help="length of a trial")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--perf", metavar="NAME", help="perf record every forwarder")
    args = p.parse_args(argv)
    factory = mode_path(args.mode)
    if factory is None:
        p.error(f"unknown mode {args.mode}")
    with ExitStack() as stack:
        build = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        bins = build_helpers(build)
        lab = stack.enter_context(Lab(prefix="mcmwn", pin=True))
        path = stack.enter_context(factory(lab, bins))
        run_trial(lab, bins, path, min(args.rate, 20000), 1)  # warm-up, not shown
        recorders = []
        if args.perf:
            (HERE / "out").mkdir(exist_ok=True)
            for name, pid in path.forwarders.items():
                data = HERE / "out" / f"{args.perf}-{name}.data"
                command = ["perf", "record", "-g", "-o", str(data), "-p", str(pid)]
                recorders.append(subprocess.Popen(command, stderr=subprocess.DEVNULL))
        try:
            for _ in range(args.trials):
                r = run_trial(lab, bins, path, args.rate, args.seconds)
                packets = max(1, r["unique"])
                parts = []
                for name in path.forwarders:
                    split = r["fwd_split_by"][name]
                    user, system = split["user_s"] / packets * 1e6, split["sys_s"] / packets * 1e6
                    total = r["fwd_cpu_s"][name] / packets * 1e6
                    parts.append(f"{name} {total:5.2f} (user {user:4.2f} sys {system:4.2f})")
                ends = {k: (v or 0.0) / packets * 1e6 for k, v in r["endpoint_cpu_s"].items()}
                parts.append(f"sender {ends['sender']:4.2f}, receiver {ends['receiver']:4.2f}")
                print(
                    f"{args.mode} {args.rate:.0f} pps  loss {r['loss']:6.3%}  us/pkt: "
                    + ", ".join(parts)
                    + (f"  drops {r['drops']}" if r["drops"] else ""),
                    flush=True,
                )
        finally:
            for recorder in recorders:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
