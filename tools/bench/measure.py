"""Trials and the rate search: send a paced stream along a BenchPath, count what
arrives, and charge the forwarders' CPU time to the packets delivered.

CPU figures:
- forwarder CPU: the POSIX CPU clock of each forwarding process (all threads, ns
  resolution; /proc/PID/schedstat is not available on every kernel) summed over the
  forwarders, delta over the trial. It includes the kernel work their own syscalls do
  (TAP read/write, UDP/TCP send, and the softirq processing that runs in their
  context), which is the honest cost of a userspace forwarder.
- endpoint CPU: the sender and the receiver report their own CPU time; forwarders +
  endpoints is the whole path's cost, and the only figure for the kernel mode (its
  forwarding runs in the sender's context).
- system CPU: the busy time of all CPUs from /proc/stat; less the above, it is the CPU
  that other work on the machine took during the trial (`other_cpus`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from modes import BenchPath
from topology import GROUP, PORT, SIZE, TTL

from mcmw.lab import Lab, LabError, run, stop

LOSS_LIMIT = 0.001  # "loss-free" means < 0.1 %
USER_HZ = os.sysconf("SC_CLK_TCK")
OTHER_LOAD_LIMIT = 0.25  # CPUs of other work above which a trial counts as disturbed


def process_cpu_ns(pid: int) -> int | None:
    """CPU time (user+system, all threads) of pid via its POSIX process CPU clock."""
    clock = ((~pid) << 3) | 2  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    try:
        return time.clock_gettime_ns(clock)
    except OSError:
        return None


def process_ticks(pid: int) -> tuple[int, int] | None:
    """(utime, stime) in clock ticks from /proc/PID/stat, for the user/system split."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]), int(fields[12])


def system_cpu() -> tuple[int, int, int]:
    """(busy, softirq, steal) ticks over all CPUs from /proc/stat. Steal is time the
    hypervisor ran something else on our virtual CPUs."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return user + nice + system + irq + softirq, softirq, steal


def background_load(seconds: float = 1.0) -> float:
    """Busy CPUs of the whole machine while the benchmark does nothing: other work on a
    2-core box skews every figure, so it is recorded with the results."""
    b0 = system_cpu()[0]
    time.sleep(seconds)
    return (system_cpu()[0] - b0) / USER_HZ / seconds


def wait_idle(limit: float, threshold: float = OTHER_LOAD_LIMIT) -> float:
    """Wait up to `limit` s for other work on the machine to stop; return the last load
    seen. The benchmark cannot make other tenants quiet, only avoid their bursts."""
    deadline = time.monotonic() + limit
    load = background_load(0.5)
    while load > threshold and time.monotonic() < deadline:
        load = background_load(1.0)
    return load


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


def cpu_snapshot(pids: dict[str, int]) -> dict[str, Any]:
    return {
        "t": time.monotonic(),
        "ns": {n: process_cpu_ns(p) for n, p in pids.items()},
        "ticks": {n: process_ticks(p) for n, p in pids.items()},
        "system": system_cpu(),
    }


def counters_snapshot(path: BenchPath) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for ns in (path.ns_send, path.ns_recv):
        snap[ns] = {"links": link_stats(ns), "snmp": snmp_counters(ns)}
    if path.counters:
        snap["path"] = path.counters()
    return snap


def counter_drops(before: dict[str, Any], after: dict[str, Any], path: BenchPath) -> dict[str, int]:
    """Non-zero increases of the kernel's drop counters along the path: where loss was."""
    drops: dict[str, int] = {}
    for ns, side in ((path.ns_send, "A"), (path.ns_recv, "B")):
        for dev, stats in after[ns]["links"].items():
            old = before[ns]["links"].get(dev, {})
            for key in ("rx_dropped", "tx_dropped"):
                d = stats.get(key, 0) - old.get(key, 0)
                if d:
                    drops[f"{side}:{dev}.{key}"] = d
        for key, value in after[ns]["snmp"].items():
            d = value - before[ns]["snmp"].get(key, 0)
            if d and key != "Udp.NoPorts":  # NoPorts: the holder's group traffic, harmless
                drops[f"{side}:{key}"] = d
    return drops


def settle(path: BenchPath, timeout: float = 10.0) -> float:
    """Wait until no packet moves in B (queues of the previous trial drained)."""
    start = time.monotonic()
    last: Any = None
    while time.monotonic() - start < timeout:
        links = link_stats(path.ns_recv)
        now = sum(s["rx_packets"] + s["tx_packets"] for s in links.values())
        if now == last:
            break
        last = now
        time.sleep(0.15)
    return time.monotonic() - start


def run_trial(
    lab: Lab, bins: dict[str, Path], path: BenchPath, rate: float, duration: float
) -> dict[str, Any]:
    """Send rate*duration datagrams at `rate` pps from A to B; count and charge them."""
    count = max(500, int(rate * duration))
    trial = secrets.randbits(32)
    common = ["-g", GROUP, "-p", str(PORT), "-T", str(trial), "-n", str(count)]
    recv_argv = [str(bins["mcrecv"]), *common, "-w", "5", "-I", "0.5"]
    if path.recv_ifaddr:
        recv_argv += ["-i", path.recv_ifaddr]
    send_argv = lab.argv(
        path.ns_send,
        [str(bins["mcsend"]), *common, "-r", str(rate), "-s", str(SIZE), "-t", str(TTL)],
    )

    receiver = lab.start_ready(path.ns_recv, recv_argv)
    try:
        c0 = counters_snapshot(path)
        s0 = cpu_snapshot(path.forwarders)
        sent = subprocess.run(send_argv, capture_output=True, text=True, timeout=duration * 3 + 20)
        if sent.returncode != 0:
            raise LabError(f"mcsend failed: {sent.stderr.strip()}")
        out, err = receiver.communicate(timeout=duration * 3 + 20)
        s1 = cpu_snapshot(path.forwarders)
        c1 = counters_snapshot(path)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"trial at {rate:.0f} pps did not finish: {exc}") from exc
    finally:
        stop(receiver)
    snd = _last_json(sent.stdout)
    rcv = _last_json(out)
    if not rcv:
        raise LabError(f"mcrecv printed no result: {err.strip()}")

    unique = rcv["unique"]
    loss = 1.0 - unique / count
    # How long after the sender's last packet the receiver's last one came: a path that
    # buffers without bound shows no loss but falls behind the offered rate.
    lag = (rcv["t_last_ns"] - snd["t_last_ns"]) / 1e9 if rcv["t_last_ns"] else None
    lag_limit = max(0.2, 0.05 * duration)
    sender_bound = snd["achieved_pps"] < 0.97 * rate

    result: dict[str, Any] = {
        "rate_pps": round(rate, 1),
        "count": count,
        "sent": snd["sent"],
        "send_errors": snd["errors"],
        "achieved_pps": snd["achieved_pps"],
        "sender_bound": sender_bound,
        "unique": unique,
        "received": rcv["received"],
        "loss": loss,
        "duplicates": rcv["duplicates"],
        "reordered": rcv["reordered"],
        "foreign": rcv["foreign"],
        "receiver_socket_drops": rcv["socket_drops"],
        "lag_s": lag,
        "drops": counter_drops(c0, c1, path),
    }
    result.update(_cpu_figures(s0, s1, unique))
    # The endpoints' own CPU (sender + receiver, measured by themselves). In the kernel
    # mode this is where the forwarding happens: veth xmit and the receive softirq run
    # in the sender's context. Endpoints + forwarders = the whole path's cost.
    endpoints = snd.get("cpu_s", 0.0) + rcv.get("cpu_s", 0.0)
    result["endpoint_cpu_s"] = {"sender": snd.get("cpu_s"), "receiver": rcv.get("cpu_s")}
    result["endpoint_us_per_pkt"] = endpoints / unique * 1e6 if unique else None
    # CPUs busy with anything but this trial's processes (other tenants of the machine):
    # a failed trial that had much of it is repeated by the search.
    ours = endpoints + result.get("fwd_cpu_total_s", 0.0)
    result["other_cpus"] = round(max(0.0, result["sys_busy_s"] - ours) / result["wall_s"], 3)
    result["path_us_per_pkt"] = (
        (endpoints + result.get("fwd_cpu_total_s", 0.0)) / unique * 1e6 if unique else None
    )
    if path.counters:
        result["path_counters"] = {"before": c0.get("path"), "after": c1.get("path")}
    why = []
    if loss >= LOSS_LIMIT:
        why.append(f"loss {loss:.2%}")
    if lag is None or lag > lag_limit:
        why.append("nothing received" if lag is None else f"lag {lag:.2f}s")
    result["ok"] = not why
    result["why"] = ", ".join(why)
    result["settle_s"] = round(settle(path), 2)
    return result


def _cpu_figures(s0: dict[str, Any], s1: dict[str, Any], packets: int) -> dict[str, Any]:
    fig: dict[str, Any] = {"wall_s": round(s1["t"] - s0["t"], 3)}
    per: dict[str, float] = {}
    for name, ns1 in s1["ns"].items():
        ns0 = s0["ns"].get(name)
        if ns0 is not None and ns1 is not None:
            per[name] = (ns1 - ns0) / 1e9
    if per:
        total = sum(per.values())
        fig["fwd_cpu_s"] = {n: round(v, 4) for n, v in per.items()}
        fig["fwd_cpu_total_s"] = round(total, 4)
        fig["fwd_us_per_pkt"] = total / packets * 1e6 if packets else None
        by = {
            name: {"user_s": (t1[0] - t0[0]) / USER_HZ, "sys_s": (t1[1] - t0[1]) / USER_HZ}
            for name, t1 in s1["ticks"].items()
            if t1 and (t0 := s0["ticks"].get(name))
        }
        fig["fwd_split_by"] = by  # per forwarder
        fig["fwd_split"] = {key: sum(part[key] for part in by.values()) for key in ("user_s", "sys_s")}
    busy = (s1["system"][0] - s0["system"][0]) / USER_HZ
    soft = (s1["system"][1] - s0["system"][1]) / USER_HZ
    fig["sys_busy_s"] = busy
    fig["steal_s"] = (s1["system"][2] - s0["system"][2]) / USER_HZ
    fig["sys_softirq_s"] = soft
    fig["sys_us_per_pkt"] = busy / packets * 1e6 if packets else None
    fig["softirq_us_per_pkt"] = soft / packets * 1e6 if packets else None
    return fig


def _last_json(text: str) -> dict[str, Any]:
    """The last JSON object a helper printed (not its {"ready": true} line)."""
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and not value.get("ready"):
            return value
    return {}


Trial = Callable[[float], dict[str, Any]]
SearchSteps = Generator[float, dict[str, Any], dict[str, Any]]


def drive_together(searches: dict[str, tuple[SearchSteps, Trial]]) -> dict[str, dict[str, Any]]:
    """Run several searches a trial at a time, in turn: the machine's speed drifts (a
    VM's neighbours, by 2x within minutes), and a drift then falls on every path alike
    instead of on whichever was searched at the time."""
    results: dict[str, dict[str, Any]] = {}
    asks: dict[str, float] = {}
    for name, (steps, _) in searches.items():
        try:
            asks[name] = next(steps)
        except StopIteration as done:
            results[name] = done.value
    while asks:
        for name in list(asks):
            steps, trial = searches[name]
            try:
                asks[name] = steps.send(trial(asks[name]))
            except StopIteration as done:
                results[name] = done.value
                del asks[name]
            except LabError as exc:  # this path broke: its search ends, the others go on
                steps.close()
                results[name] = {"error": str(exc)}
                del asks[name]
    return results


def search_steps(
    mode: str, *, start: float, ceiling: float, precision: float, log: Any = print
) -> SearchSteps:
    """Highest rate with < 0.1 % loss and no lag: double from `start` until a trial
    fails (or the sender cannot go faster), bisect in log space until the bracket is
    within `precision`, then confirm the result with a repeat trial. A generator: it
    yields each rate to try and is sent that trial's result."""
    trials: list[dict[str, Any]] = []

    def attempt(rate: float) -> Generator[float, dict[str, Any], dict[str, Any]]:
        r = yield rate
        if not r["ok"] and r["other_cpus"] > OTHER_LOAD_LIMIT:
            # Other work on the machine took CPU from this trial: once it has gone (or
            # after 10 s), try the rate again rather than blame the path.
            log(
                f"  {mode:9s} --- {rate:9.0f} pps  failed with {r['other_cpus']:.2f} CPUs"
                " of other load; repeating"
            )
            r["disturbed"] = True
            trials.append(r)
            wait_idle(10)
            r = yield rate
        trials.append(r)
        flag = "ok " if r["ok"] else "BAD"
        cpu = r.get("fwd_us_per_pkt")
        cpu_txt = f"  fwd {cpu:6.2f} us/pkt" if cpu is not None else ""
        log(
            f"  {mode:9s} {flag} {rate:9.0f} pps  loss {r['loss']:7.3%}"
            f"  sent {r['achieved_pps']:9.0f} pps{cpu_txt}"
            f"{'  ' + r['why'] if r['why'] else ''}"
            f"{'  drops ' + str(r['drops']) if r['drops'] and not r['ok'] else ''}"
            f"{'  steal ' + str(r['steal_s']) + ' s' if r['steal_s'] else ''}"
        )
        return r

    good: float | None = None
    bad: float | None = None
    sender_bound = False
    rate = start
    # Bracket: double until failure; halve first if even `start` fails.
    while True:
        r = yield from attempt(rate)
        if r["ok"]:
            good = rate
            if r["sender_bound"]:
                sender_bound = True
                break
            if bad is not None or rate * 2 > ceiling:
                break
            rate *= 2
        else:
            bad = rate
            if good is not None or rate / 2 < 250:
                break
            rate /= 2
    if good is not None and bad is not None and not sender_bound:
        while bad / good > precision:
            mid = math.sqrt(good * bad)
            if (yield from attempt(mid))["ok"]:
                good = mid
            else:
                bad = mid
    confirm = None
    while good is not None and good >= start:
        confirm = yield from attempt(good)
        if confirm["ok"]:
            break
        # A failed repeat means the rate was marginal (or the machine got slower): step
        # down and try again, down to the first rate tried (a bounded number of steps).
        good = good / precision
    if confirm is None or not confirm["ok"]:
        good = None
    else:
        # A sender-bound run offers less than its target: report what was offered.
        good = min(good, confirm["achieved_pps"])
    # What stopped the rate: the receiver's own socket overflowing means the endpoint,
    # not the path, was the limit (as for the kernel at high rates).
    failed = [t for t in trials if not t["ok"] and not t.get("disturbed") and t["rate_pps"] > (good or 0)]
    lowest = min(failed, key=lambda t: t["rate_pps"]) if failed else None
    if sender_bound:
        limit = "sender"
    elif lowest is None:
        limit = "ceiling"
    elif lowest["receiver_socket_drops"] * 2 >= lowest["count"] - lowest["unique"] > 0:
        limit = "receiver"
    else:
        limit = "path"
    return {
        "max_pps": round(good, 0) if good else None,
        "limit": limit,
        "max_mbps": round(good * SIZE * 8 / 1e6, 1) if good else None,
        "sender_bound": sender_bound,
        "at_max": confirm,
        "trials": trials,
    }
