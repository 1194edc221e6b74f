"""The `mcmw` command line: parse arguments, dispatch, map failures to exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or invalid input: printed as one line, exit 2."""


SOCKET_DIR = "/run/mcmw"


def default_socket(node: str) -> str:
    return f"{SOCKET_DIR}/{node}.sock"


def only_socket() -> str:
    """`mcmw status` with neither --node nor --socket: the one node that runs here."""
    from pathlib import Path

    sockets = sorted(Path(SOCKET_DIR).glob("*.sock"))
    if len(sockets) == 1:
        return str(sockets[0])
    if not sockets:
        raise OSError(f"no node at {SOCKET_DIR} (is mcmw run going?)")
    names = ", ".join(path.stem for path in sockets)
    raise UsageError(f"several nodes run here ({names}): give --node NAME or --socket PATH")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcmw", description="Multicast Middleware")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run one node in the foreground")
    p.add_argument("-c", "--config", required=True, metavar="TREE.yaml")
    p.add_argument("--node", required=True)
    p.add_argument("--socket", metavar="PATH", help="control socket (default /run/mcmw/NODE.sock)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")

    p = sub.add_parser("check", help="validate a tree file; exit 0 if valid")
    p.add_argument("-c", "--config", required=True, metavar="TREE.yaml")

    p = sub.add_parser("status", help="show a running node's state")
    where = p.add_mutually_exclusive_group()  # neither: the one node running here
    where.add_argument("--node")
    where.add_argument("--socket", metavar="PATH")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("decode", help="how mcmw reads each frame of a capture")
    p.add_argument("file", metavar="FILE.pcap")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("replay", help="drive a node's core with a capture")
    p.add_argument("file", metavar="FILE.pcap")
    p.add_argument("-c", "--config", required=True, metavar="TREE.yaml")
    p.add_argument("--node", required=True)
    p.add_argument("--out", metavar="OUT.pcap")
    p.add_argument("--json", action="store_true")
    p.add_argument("--live", action="store_true", help="send the frames into the running node's TAP")
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        metavar="X",
        help="with --live: X times the capture's pace (0: no pauses)",
    )

    p = sub.add_parser("map", help="the overlay address a group maps to")
    p.add_argument("group")
    p.add_argument("-c", "--config", metavar="TREE.yaml")

    p = sub.add_parser("demo", help="a local tree in network namespaces, streamed end to end")
    p.add_argument("--duration", type=float, default=30.0, help="seconds to stream (default 30)")
    return parser


def cmd_check(args: argparse.Namespace) -> int:
    from mcmw.config import load_tree

    tree = load_tree(args.config)
    for warning in tree.warnings:
        print(f"mcmw check: warning: {warning}", file=sys.stderr)
    nodes, links = len(tree.nodes), len(tree.links)
    print(
        f"{args.config}: valid tree of {nodes} node{'s' * (nodes != 1)} "
        f"and {links} link{'s' * (links != 1)}"
    )
    return EXIT_OK


def cmd_map(args: argparse.Namespace) -> int:
    from mcmw.config import OverlayConfig, load_tree
    from mcmw.mapping import overlay_address, parse_group

    overlay = load_tree(args.config).overlay if args.config else OverlayConfig()
    try:
        group = parse_group(args.group)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    address = overlay_address(group, overlay.mapping, overlay.address_bits)
    print(f"{group} -> {address} ({overlay.mapping}, {overlay.address_bits} bits)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from mcmw.runtime import run_node

    return run_node(args.config, args.node, args.socket or default_socket(args.node), args.verbose)


def cmd_status(args: argparse.Namespace) -> int:
    from mcmw.control import show_status

    if args.socket:
        path = args.socket
    elif args.node:
        path = default_socket(args.node)
    else:
        path = only_socket()
    return show_status(path, args.json)


def cmd_decode(args: argparse.Namespace) -> int:
    from mcmw.decode import decode_main

    return decode_main(args)


def cmd_replay(args: argparse.Namespace) -> int:
    from mcmw.replay import replay_main

    return replay_main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from mcmw.demo import run_demo

    return run_demo(args.duration)


COMMANDS = {
    "run": cmd_run,
    "check": cmd_check,
    "status": cmd_status,
    "decode": cmd_decode,
    "replay": cmd_replay,
    "map": cmd_map,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    from mcmw.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError) as exc:
        print(f"mcmw {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_RUNTIME
    except OSError as exc:
        print(f"mcmw {args.command}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
