"""mcmw forwarding benchmark: kernel vs. a minimal C relay vs. mcmw, in one run.

    sudo .venv/bin/python tools/bench/run.py [--modes kernel,c-relay,mcmw] [--quick]

For each mode a stream of 1316-byte UDP datagrams to 239.1.1.1 (TTL 16) goes from a
sender in namespace A to a receiver in namespace B. The run finds the highest rate
with < 0.1 % loss and measures the forwarders' CPU time per packet at one fixed rate,
prints a table and writes everything (every trial, drop counters) as JSON to
tools/bench/out/. See tools/bench/README.md and docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, so this directory is on sys.path and the siblings import directly.
import modes
from measure import background_load, drive_together, run_trial, search_steps, wait_idle
from modes import HERE, MCMW_MODES, MODES, REPO, BenchPath, build_helpers, mode_path
from topology import GROUP, SIZE, TTL

from mcmw.lab import Lab, LabError

RATE_BAR, CPU_BAR = 0.70, 2.0  # the issue's bar: mcmw rate >= 70 %, CPU/pkt <= 2x C


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def revision() -> dict[str, Any]:
    """The checkout's commit and the node's files changed since it: what `mcmw` was."""

    def git(*argv: str) -> str:
        try:
            out = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.rstrip() if out.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "mcmw", "overlay", "tap", "igmp")
    return {
        "head": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted": [line[3:] for line in dirty.splitlines()],
    }


def warm_up(mode: str, lab: Lab, path: BenchPath, bins: dict[str, Path]) -> None:
    """Prove the path works before the search relies on it: a slow trial, with one
    retry (a path that has only just come up may still be settling)."""
    for attempt in range(2):
        warm = run_trial(lab, bins, path, 1000, 0.5)
        if warm["unique"]:
            break
        if attempt:
            counters = (warm.get("path_counters") or {}).get("after")
            raise LabError(
                f"{mode}: nothing arrives at 1000 pps (drops: {warm['drops']}"
                + (f"; path counters: {json.dumps(counters)}" if counters else "")
                + ")"
            )
        time.sleep(2)
    print(f"  {mode}: {path.describe}")


def bench_modes(
    names: list[str], bins: dict[str, Path], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Bring every mode's path up, then search their rates a trial at a time in turn,
    then the CPU trials, again in turn: a drift of the machine's speed (a VM's
    neighbours) then weighs on every mode alike and the ratios stay honest."""
    results: dict[str, dict[str, Any]] = {}
    live: dict[str, tuple[Lab, BenchPath]] = {}
    with contextlib.ExitStack() as stack:
        for mode in names:
            print(f"bench: {mode}")
            result: dict[str, Any] = {"mode": mode}
            results[mode] = result
            busy = result["background_cpus_busy"] = round(wait_idle(args.wait_idle), 3)
            if busy > 0.25:
                print(
                    f"  {mode}: machine busy ({busy:.2f} CPUs of other work); figures will be low and noisy",
                    file=sys.stderr,
                )
            try:
                lab = stack.enter_context(Lab(prefix="mcmwb", nice=args.nice, pin=args.pin))
                factory = mode_path(mode)
                assert factory is not None  # checked by parse_args
                path = stack.enter_context(factory(lab, bins))
                result["path"] = path.describe
                result["namespaces"] = [path.ns_send, path.ns_recv]
                result["extra"] = path.extra  # filled in at teardown (relay counters)
                warm_up(mode, lab, path, bins)
                live[mode] = (lab, path)
            except LabError as exc:
                print(f"bench: {mode}: {exc}", file=sys.stderr)
                results[mode] = {"mode": mode, "error": str(exc)}

        if live:
            print("bench: highest loss-free rates, modes in turn")
        started = time.monotonic()
        searches = {
            mode: (
                search_steps(mode, start=args.start, ceiling=args.ceiling, precision=args.precision),
                functools.partial(run_trial, lab, bins, path, duration=args.duration),
            )
            for mode, (lab, path) in live.items()
        }
        for mode, search in drive_together(searches).items():
            if "error" in search:  # the path broke during its search
                print(f"bench: {mode}: {search['error']}", file=sys.stderr)
                results[mode] = {"mode": mode, "error": search["error"]}
                del live[mode]
                continue
            results[mode]["search"] = search
            results[mode]["search_s"] = round(time.monotonic() - started, 1)  # all modes together

        # CPU per packet at one rate for every mode, so modes are compared at equal load
        # (per-packet cost falls as rates rise and wake-ups carry more packets). The
        # median of a few trials: single trials vary with where wake-ups land.
        if live:
            print(f"bench: CPU per packet at {args.cpu_rate:.0f} pps, modes in turn")
        cpu_trials: dict[str, list[dict[str, Any]]] = {mode: [] for mode in live}
        for _ in range(args.cpu_repeats):
            for mode, (lab, path) in live.items():
                try:
                    cpu = run_trial(lab, bins, path, args.cpu_rate, args.duration)
                except LabError as exc:
                    results[mode]["cpu_error"] = str(exc)
                    continue
                cpu_trials[mode].append(cpu)
                print(
                    f"  {mode:18s} loss {cpu['loss']:7.3%}"
                    f"  fwd {_fmt(cpu.get('fwd_us_per_pkt'))} us/pkt"
                    f"  path {_fmt(cpu.get('path_us_per_pkt'))} us/pkt"
                )
        for mode, trials in cpu_trials.items():
            key = "fwd_us_per_pkt" if live[mode][1].forwarders else "path_us_per_pkt"
            trials.sort(key=lambda t: t.get(key) or 0.0)
            results[mode]["at_cpu_rate"] = trials[len(trials) // 2] if trials else {}
            results[mode]["cpu_trials"] = trials
    return results


def _fmt(value: float | None, spec: str = "6.2f") -> str:
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return f"{'n/a':>{width or 0}s}"
    return format(value, spec)


def summary(results: dict[str, dict[str, Any]], cpu_rate: float) -> list[str]:
    """The table: rate, then CPU per packet of the forwarders and of the whole path
    (sender + forwarders + receiver) at the common rate, and the forwarders' at max."""
    at = f"@{cpu_rate / 1000:.0f}k pps"
    cols = [
        ("max pps", "<0.1% loss", 10),
        ("Mbit/s", "", 7),
        ("fwd us/pkt", at, 11),
        ("path us/pkt", at, 12),
        ("fwd us/pkt", "@max", 11),
    ]
    mw = max(10, *map(len, results)) if results else 10  # the mode column's width
    head = f"{'mode':{mw}s}" + "".join(f" {h:>{w}s}" for h, _, w in cols) + "  notes"
    sub = f"{'':{mw}s}" + "".join(f" {s:>{w}s}" for _, s, w in cols)
    lines = [head, sub, "-" * len(head)]
    for mode, r in results.items():
        if "error" in r:
            lines.append(f"{mode:{mw}s} error: {r['error']}")
            continue
        s, c = r["search"], r.get("at_cpu_rate") or {}
        at_max = s.get("at_max") or {}
        notes = []
        if s["max_pps"] is None:
            notes.append("no loss-free rate found")
        if s.get("limit") in ("sender", "receiver", "ceiling"):
            notes.append(f"{s['limit']}-bound: the path is at least this fast")
        if not c:
            notes.append(f"no cpu trial: {r.get('cpu_error', '?')}")
        elif not c["ok"]:
            notes.append(f"cpu trial not clean: {c['why']}")
        if mode == "kernel":
            notes.append("forwarding runs in the sender's softirq: see path")
        values = [
            f"{s['max_pps'] or 0:10.0f}",
            f"{s['max_mbps'] or 0:7.1f}",
            _fmt(c.get("fwd_us_per_pkt"), "11.2f"),
            _fmt(c.get("path_us_per_pkt"), "12.2f"),
            _fmt(at_max.get("fwd_us_per_pkt"), "11.2f"),
        ]
        lines.append(f"{mode:{mw}s} " + " ".join(values) + "  " + "; ".join(notes))
    return lines


def by_rate(results: dict[str, dict[str, Any]], start: float) -> list[str]:
    """fwd (and path) us/pkt at the search's first rates, from trials that were clean:
    how the per-packet cost falls as wake-ups carry more packets."""
    rates = [start * 2**i for i in range(4)]
    mw = max(10, *map(len, results)) if results else 10
    head = f"{'mode':{mw}s}" + "".join(f" {f'{r / 1000:.0f}k pps':>15s}" for r in rates)
    lines = ["fwd / path us/pkt by rate", head, "-" * len(head)]
    for mode, r in results.items():
        if "error" in r:
            continue
        cells = []
        for rate in rates:
            trial = next((t for t in r["search"]["trials"] if t["ok"] and t["rate_pps"] == rate), None)
            if trial is None:
                cells.append(f"{'-':>15s}")
                continue
            fwd, path = trial.get("fwd_us_per_pkt"), trial.get("path_us_per_pkt")
            cells.append(f"{_fmt(fwd, '.1f')} / {_fmt(path, '.1f')}".rjust(15))
        lines.append(f"{mode:{mw}s} " + " ".join(cells))
    return lines


def ratios(results: dict[str, dict[str, Any]], baseline: str, modes: list[str]) -> dict[str, Any]:
    """Each of `modes` / `baseline` for rate and CPU per packet, against the issue's bar."""
    base = results.get(baseline)
    out: dict[str, Any] = {}
    if not base or "error" in base:
        return out
    for mode in modes:
        r = results[mode]
        if "error" in r:
            continue
        rate = (
            (r["search"]["max_pps"] or 0) / base["search"]["max_pps"] if base["search"]["max_pps"] else None
        )
        c_mode = (r.get("at_cpu_rate") or {}).get("fwd_us_per_pkt")
        c_base = (base.get("at_cpu_rate") or {}).get("fwd_us_per_pkt")
        cpu = c_mode / c_base if c_mode and c_base else None
        out[mode] = {
            "rate_ratio": rate,
            "cpu_ratio": cpu,
            "rate_ok": rate is not None and rate >= RATE_BAR,
            "cpu_ok": cpu is not None and cpu <= CPU_BAR,
        }
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--modes",
        default="kernel,c-relay,mcmw",
        help=f"comma-separated, from {','.join([*MODES, *MCMW_MODES])}; any "
        "mcmw[-udp][-auth][-N] (UDP channel, authentication, N more groups routed) "
        "(default %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="1 s trials, coarser search")
    p.add_argument("--duration", type=float, help="seconds of packets per trial (default 2)")
    p.add_argument(
        "--cpu-rate",
        type=float,
        default=20000,
        help="fixed rate for the CPU-per-packet trial (default %(default)s pps)",
    )
    p.add_argument("--cpu-repeats", type=int, help="CPU trials at --cpu-rate, median kept (default 3)")
    p.add_argument("--start", type=float, default=10000, help="first rate tried (pps)")
    p.add_argument("--ceiling", type=float, default=1_000_000, help="highest rate tried (pps)")
    p.add_argument("--precision", type=float, help="stop bisecting at high/low < this")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=20,
        help="wait up to this many s per mode for other load to stop (default 20)",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run every benchmark process at this niceness, e.g. -10 on a shared machine",
    )
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run site A's processes on CPU 0 and site B's on CPU 1 (default: yes)",
    )
    p.add_argument(
        "--mcmw",
        metavar="CMD",
        help="command that runs mcmw (default: .venv/bin/python -m mcmw of this checkout)",
    )
    p.add_argument("--out", type=Path, default=HERE / "out", help="directory for JSON results")
    args = p.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 2.0)
    args.precision = args.precision or (1.25 if args.quick else 1.1)
    args.cpu_repeats = args.cpu_repeats or (1 if args.quick else 3)
    if args.mcmw:
        modes.MCMW_COMMAND[:] = shlex.split(args.mcmw)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if mode_path(m) is None]
    if unknown:
        choices = ", ".join([*MODES, *MCMW_MODES, "mcmw[-udp][-auth][-N]"])
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from {choices}")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (namespaces, TAP devices)", file=sys.stderr)
        return 2
    for tool in ("ip", "gcc"):
        if not shutil.which(tool):
            print(f"bench: needs {tool}", file=sys.stderr)
            return 2
    # SIGTERM unwinds like Ctrl-C, so every `finally` tears its namespaces down.
    signal.signal(signal.SIGTERM, _interrupt)

    started = time.monotonic()
    info = machine()
    info["background_cpus_busy"] = round(background_load(), 3)
    print(
        f"bench: {info['nproc']} x {info['cpu_model']}, kernel {info['kernel']}, "
        f"background load {info['background_cpus_busy']:.2f} CPUs"
    )
    if info["background_cpus_busy"] > 0.2:
        print(
            "bench: warning: the machine is not idle; figures will be low and noisy",
            file=sys.stderr,
        )
    results: dict[str, dict[str, Any]] = {}
    builddir = Path(tempfile.mkdtemp(prefix="mcmwb-build-"))
    try:
        bins = build_helpers(builddir)
        results = bench_modes(args.modes, bins, args)
    except KeyboardInterrupt:
        print("bench: interrupted; namespaces removed", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(builddir, ignore_errors=True)

    mcmw = [mode for mode in results if mode.startswith("mcmw")]
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info,
        "revision": revision(),
        "stream": {"group": GROUP, "size": SIZE, "ttl": TTL},
        "params": {
            "modes": args.modes,
            "duration_s": args.duration,
            "cpu_rate_pps": args.cpu_rate,
            "cpu_repeats": args.cpu_repeats,
            "start_pps": args.start,
            "ceiling_pps": args.ceiling,
            "precision": args.precision,
            "wait_idle_s": args.wait_idle,
            "nice": args.nice,
            "pin": args.pin,
            "mcmw_command": modes.MCMW_COMMAND,
            "loss_limit": 0.001,
        },
        "results": results,
        "ratios": ratios(results, "c-relay", mcmw),
        # Beside the same crypto in C: the authenticated modes.
        "ratios_auth": ratios(results, "c-relay-auth", [m for m in mcmw if "auth" in m.split("-")]),
        "elapsed_s": round(time.monotonic() - started, 1),
        "command": " ".join([sys.executable, *sys.argv]),
    }
    print()
    for line in summary(results, args.cpu_rate):
        print(line)
    print()
    for line in by_rate(results, args.start):
        print(line)
    print()
    for baseline, key in (("c-relay", "ratios"), ("c-relay-auth", "ratios_auth")):
        for mode, r in report[key].items():
            rate, cpu = r["rate_ratio"], r["cpu_ratio"]
            print(
                f"{mode} / {baseline}: rate {_fmt(rate, '.2f')} (bar >= {RATE_BAR}: "
                f"{'pass' if r['rate_ok'] else 'FAIL'}), CPU/pkt {_fmt(cpu, '.2f')} "
                f"(bar <= {CPU_BAR}: {'pass' if r['cpu_ok'] else 'FAIL'})"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"bench: {report['elapsed_s']:.0f} s; results in {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
