"""The tree file loader: examples load, every rule rejects with FILE:LINE: KEY: why."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igmp.params import IGMP_DEFAULTS, MLD_DEFAULTS
from mcmw.config import ConfigError, Link, TreeConfig, load_tree, parse_duration

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "configs").glob("*.yaml"))

# A valid tree; the cases below edit one line of it and know every line number.
BASE = """\
overlay:
  address_bits: 24
  mapping: modulo
nodes:
  alice:
    listen: 127.0.0.1:7000
    udp: 7001
    tap:
      name: mcmw0
      address: 169.254.1.1/16
    igmp: {version: 3, query_interval: 125s, robustness: 2}
    mld: {version: 2}
  bob:
    listen: 127.0.0.1:7010
    tap: {name: mcmw1, address: 169.254.1.2/16}
links:
  - [alice, bob]
"""

# Three more nodes on the same subnet, for tree-shape cases.
FOUR = """\
nodes:
  a: {listen: "10.0.0.1:7000", tap: {name: t, address: 169.254.0.1/16}}
  b: {listen: "10.0.0.2:7000", tap: {name: t, address: 169.254.0.2/16}}
  c: {listen: "10.0.0.3:7000", tap: {name: t, address: 169.254.0.3/16}}
  d: {listen: "10.0.0.4:7000", tap: {name: t, address: 169.254.0.4/16}}
"""


def edit(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def write(tmp_path: Path, text: str, name: str = "tree.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_tree(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:")
    return message[len(str(path)) :]


# --- the examples and the base tree --------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    tree = load_tree(path)
    assert tree.nodes
    assert len(tree.links) == len(tree.nodes) - 1
    assert tree.warnings == ()


def test_the_examples_are_there() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"two-sites.yaml", "line-three.yaml", "star-seven.yaml"} <= names


def test_star_seven_shape() -> None:
    tree = load_tree(REPO / "configs" / "star-seven.yaml")
    assert len(tree.nodes) == 7
    assert all(node.udp for node in tree.nodes.values())
    assert sorted(peer for peer, _ in tree.neighbours("root")) == ["east", "west"]
    # Anchors and `<<:` merges carry the shared querier settings.
    assert tree.nodes["west1"].igmp == tree.nodes["root"].igmp
    assert tree.nodes["east1"].igmp.version == 2
    assert tree.nodes["east1"].igmp.query_interval == 60.0


def test_base_tree_values(tmp_path: Path) -> None:
    tree = load_tree(write(tmp_path, BASE))
    assert isinstance(tree, TreeConfig)
    assert tree.overlay.address_bits == 24
    assert tree.overlay.mapping == "modulo"
    assert tree.overlay.ttl == "hop"
    assert (tree.overlay.keepalive_interval, tree.overlay.dead_interval) == (3.0, 10.0)
    assert tree.overlay.secret_file is None
    alice, bob = tree.nodes["alice"], tree.nodes["bob"]
    assert alice.listen == ("127.0.0.1", 7000)
    assert alice.udp == 7001 and bob.udp is None
    assert alice.tap.name == "mcmw0"
    assert alice.tap.address == ipaddress.IPv4Interface("169.254.1.1/16")
    assert alice.tap.mtu == 1500
    assert alice.igmp.version == 3 and alice.igmp.query_interval == 125.0
    assert alice.mld == MLD_DEFAULTS
    assert bob.igmp == IGMP_DEFAULTS
    assert tree.links == (Link("alice", "bob"),)
    assert tree.neighbours("alice") == [("bob", True)]
    assert tree.neighbours("bob") == [("alice", False)]


def test_one_node_tree(tmp_path: Path) -> None:
    text = "nodes:\n  solo: {listen: 127.0.0.1:7000, tap: {name: t, address: 10.1.0.1/16}}\n"
    tree = load_tree(write(tmp_path, text + "links: []\n"))
    assert list(tree.nodes) == ["solo"] and tree.links == ()


def test_optional_keys(tmp_path: Path) -> None:
    (tmp_path / "psk.key").write_text("correct-horse-battery-staple\n")
    (tmp_path / "psk.key").chmod(0o600)
    text = edit(
        "  mapping: modulo\n",
        "  mapping: identity\n  address_bits: 32\n  secret_file: psk.key\n  ttl: link\n"
        "  keepalive_interval: 1s\n  dead_interval: 4s\n",
        edit("  address_bits: 24\n", ""),
    )
    text = edit(
        "tap: {name: mcmw1, address: 169.254.1.2/16}",
        "tap: {name: mcmw1, address: 169.254.1.2/16, mtu: 9000, ipv6_scopes: [5, 0x8, E]}",
        text,
    )
    text = edit("    mld: {version: 2}\n", "    mld: {version: 1, query_response_interval: 2s}\n", text)
    tree = load_tree(write(tmp_path, text))
    assert tree.overlay.mapping == "identity" and tree.overlay.address_bits == 32
    assert tree.overlay.secret_file == tmp_path / "psk.key"
    assert tree.overlay.ttl == "link"
    assert (tree.overlay.keepalive_interval, tree.overlay.dead_interval) == (1.0, 4.0)
    assert tree.nodes["bob"].tap.mtu == 9000
    assert tree.nodes["bob"].tap.ipv6_scopes == (5, 8, 14)
    assert tree.nodes["alice"].mld.version == 1
    assert tree.nodes["alice"].mld.query_response_interval == 2.0
    assert tree.warnings == ()


def test_secret_file_is_relative_to_the_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "site"
    sub.mkdir()
    (sub / "psk.key").write_text("k" * 16)
    path = write(sub, edit("  mapping: modulo\n", "  mapping: modulo\n  secret_file: psk.key\n"))
    monkeypatch.chdir(tmp_path)  # the key is not in the current directory
    assert load_tree(Path("site") / path.name).overlay.secret_file == sub / "psk.key"


def test_full_querier_section(tmp_path: Path) -> None:
    section = (
        "    igmp:\n"
        "      version: 2\n"
        "      query_interval: 2m\n"
        "      query_response_interval: 100ms\n"
        "      robustness: 3\n"
        "      last_member_query_interval: 500ms\n"
        "      last_member_query_count: 4\n"
        "      startup_query_interval: 30\n"
        "      startup_query_count: 5\n"
        "      max_groups: 100\n"
        "      max_sources: 10\n"
    )
    text = edit("    igmp: {version: 3, query_interval: 125s, robustness: 2}\n", section)
    igmp = load_tree(write(tmp_path, text)).nodes["alice"].igmp
    assert igmp.version == 2
    assert igmp.query_interval == 120.0
    assert igmp.query_response_interval == pytest.approx(0.1)
    assert igmp.robustness == 3
    assert igmp.last_member_query_interval == 0.5
    assert igmp.last_member_query_count == 4
    assert igmp.startup_query_interval == 30.0
    assert igmp.startup_query_count == 5
    assert (igmp.max_groups, igmp.max_sources) == (100, 10)


def test_ipv6_listen_and_empty_scopes(tmp_path: Path) -> None:
    text = edit("listen: 127.0.0.1:7010", 'listen: "[2001:db8::1]:7010"')
    text = edit("address: 169.254.1.2/16}", "address: 169.254.1.2/16, ipv6_scopes: []}", text)
    bob = load_tree(write(tmp_path, text)).nodes["bob"]
    assert bob.listen == ("2001:db8::1", 7010)
    assert bob.tap.ipv6_scopes == ()


def test_robustness_one_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, edit("robustness: 2", "robustness: 1"))
    tree = load_tree(path)
    assert tree.nodes["alice"].igmp.robustness == 1
    assert len(tree.warnings) == 1
    assert tree.warnings[0].startswith(f"{path}:11: nodes.alice.igmp.robustness: ")


def test_small_mtu_and_open_secret_are_warnings(tmp_path: Path) -> None:
    key = tmp_path / "psk.key"
    key.write_text("k" * 16)
    key.chmod(0o644)
    text = edit("  mapping: modulo\n", "  mapping: modulo\n  secret_file: psk.key\n")
    text = edit("address: 169.254.1.2/16}", "address: 169.254.1.2/16, mtu: 576}", text)
    warnings = load_tree(write(tmp_path, text)).warnings
    assert [w.split(": ")[1] for w in warnings] == ["overlay.secret_file", "nodes.bob.tap.mtu"]


def test_merge_keys_and_explicit_keys_win(tmp_path: Path) -> None:
    text = edit(
        "    mld: {version: 2}\n",
        "    mld: &m {version: 2, robustness: 3}\n",
    )
    text = edit(
        "tap: {name: mcmw1, address: 169.254.1.2/16}\n",
        "tap: {name: mcmw1, address: 169.254.1.2/16}\n    mld: {<<: *m, robustness: 4}\n",
        text,
    )
    bob = load_tree(write(tmp_path, text)).nodes["bob"]
    assert (bob.mld.version, bob.mld.robustness) == (2, 4)


# --- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("125s", 125.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("10", 10.0),
        ("0.1", 0.1),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("2.5m", 150.0),
        (" 3s ", 3.0),
        ("3 s", 3.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["12x", "", "s", "-1s", "+1s", "1e3", "inf", "nan", "1:30", "0x10", "1m30s", "5 ms s"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("125s", 125.0),
        ("2m", 120.0),
        ("90", 90.0),
        ("17.5", 17.5),
        ('"60s"', 60.0),
        ("30000ms", 30.0),
    ],
)
def test_durations_in_the_tree(tmp_path: Path, written: str, seconds: float) -> None:
    text = edit("query_interval: 125s", f"query_interval: {written}")
    assert load_tree(write(tmp_path, text)).nodes["alice"].igmp.query_interval == seconds


@pytest.mark.parametrize(
    ("written", "why"),
    [
        ("12x", "'12x' is not a duration (write 125s, 500ms or 2m)"),
        ("1:30", "'1:30' is not a duration"),  # YAML 1.1 would read 90
        ("0s", "'0s' must be longer than zero"),
        ("-5s", "'-5s' is not a duration"),
        ("[1, 2]", "expected a single value, found a list"),
        ("null", "has no value"),
    ],
)
def test_bad_durations(tmp_path: Path, written: str, why: str) -> None:
    text = edit("query_interval: 125s", f"query_interval: {written}")
    assert error_of(tmp_path, text).startswith(f":11: nodes.alice.igmp.query_interval: {why}")


# --- each rule, with its line and key ------------------------------------------------

CASES = [
    # structure
    (
        "  mapping: modulo\n",
        "  mapping: modulo\n  colour: red\n",
        ":4: overlay.colour: unknown key",
    ),
    ("overlay:\n", "overlays:\n", ":1: overlays: unknown key (did you mean 'overlay'?)"),
    ("    udp: 7001\n", "    udp: 7001\n    ud: 7002\n", ":8: nodes.alice.ud: unknown key"),
    (
        "      name: mcmw0\n",
        "      name: mcmw0\n      nmae: x\n",
        ":10: nodes.alice.tap.nmae: unknown",
    ),
    ("robustness: 2}", "robustness: 2, qi: 3}", ":11: nodes.alice.igmp.qi: unknown key"),
    (
        "    mld: {version: 2}",
        "    mld: {version: 2, mode: x}",
        ":12: nodes.alice.mld.mode: unknown",
    ),
    ("    listen: 127.0.0.1:7000\n", "", ":5: nodes.alice.listen: missing (required)"),
    ("      address: 169.254.1.1/16\n", "", ":8: nodes.alice.tap.address: missing (required)"),
    (
        "tap: {name: mcmw1, address: 169.254.1.2/16}",
        "tap: {address: 169.254.1.2/16}",
        ":15: nodes.bob.tap.name: missing (required)",
    ),
    ("links:\n  - [alice, bob]\n", "", ":1: links: missing (required)"),
    (
        "    udp: 7001\n",
        "    udp: 7001\n    udp: 7002\n",
        ":8: nodes.alice.udp: duplicate key (first given on line 7)",
    ),
    ("  bob:\n", "  alice:\n", ":13: nodes.alice: duplicate key (first given on line 5)"),
    (
        "overlay:\n  address_bits: 24\n  mapping: modulo\n",
        "overlay: fast\n",
        ":1: overlay: expected a mapping of keys, found 'fast'",
    ),
    ("    mld: {version: 2}", "    mld: [2]", ":12: nodes.alice.mld: expected a mapping of keys"),
    ("  - [alice, bob]", "  - alice", ":17: links[0]: expected [dialer, acceptor]"),
    ("  - [alice, bob]", "  - [alice, bob, alice]", ":17: links[0]: expected [dialer, acceptor]"),
    ("links:\n  - [alice, bob]", "links: {alice: bob}", ":16: links: expected a list of"),
    ("links:\n  - [alice, bob]", "links:", ":16: links: has no value (write links: [] for"),
    # overlay
    ("address_bits: 24", "address_bits: 0", ":2: overlay.address_bits: 0 is out of range"),
    ("address_bits: 24", "address_bits: 129", ":2: overlay.address_bits: 129 is out of range"),
    ("address_bits: 24", "address_bits: 2.5", ":2: overlay.address_bits: '2.5' is not a whole"),
    ("address_bits: 24", "address_bits: 0x18", ":2: overlay.address_bits: '0x18' is not a whole"),
    ("mapping: modulo", "mapping: random", ":3: overlay.mapping: 'random' is not one of identity"),
    (
        "mapping: modulo",
        "mapping: identity",
        ":2: overlay.address_bits: identity mapping needs address_bits 32 or more",
    ),
    (
        "  mapping: modulo\n",
        "  mapping: modulo\n  ttl: 5\n",
        ":4: overlay.ttl: '5' is not one of hop",
    ),
    (
        "  mapping: modulo\n",
        "  mapping: modulo\n  secret_file: nope.key\n",
        ":4: overlay.secret_file: 'nope.key' does not exist",
    ),
    (
        "  mapping: modulo\n",
        "  mapping: modulo\n  keepalive_interval: 10s\n",
        ":4: overlay.keepalive_interval: keepalive_interval (10s) must be shorter than dead_",
    ),
    (
        "  mapping: modulo\n",
        "  mapping: modulo\n  dead_interval: 2s\n",
        ":4: overlay.dead_interval: keepalive_interval (3s) must be shorter than dead_interval",
    ),
    (
        "  mapping: modulo\n",
        "  mapping: modulo\n  dead_interval: soon\n",
        ":4: overlay.dead_interval: 'soon' is not a duration",
    ),
    # node
    ("  bob:\n", "  bob/x:\n", ":13: nodes.bob/x: node name 'bob/x' must start with"),
    ("127.0.0.1:7000", "127.0.0.1", ":6: nodes.alice.listen: '127.0.0.1' is not host:port"),
    (
        "127.0.0.1:7000",
        "localhost:7000",
        ":6: nodes.alice.listen: 'localhost:7000' is not host:port",
    ),
    ("127.0.0.1:7000", "127.0.0.256:7000", ":6: nodes.alice.listen: '127.0.0.256:7000' is not"),
    ("127.0.0.1:7000", "::1:7000", ":6: nodes.alice.listen: '::1:7000' is not host:port"),
    ("127.0.0.1:7000", "127.0.0.1:70000", ":6: nodes.alice.listen: port '70000' is not a port"),
    ("127.0.0.1:7000", "127.0.0.1:0", ":6: nodes.alice.listen: port '0' is not a port number"),
    ("127.0.0.1:7000", "127.0.0.1:http", ":6: nodes.alice.listen: port 'http' is not a port"),
    ("127.0.0.1:7000", "0.0.0.0:7000", ":6: nodes.alice.listen: 0.0.0.0 is not an address peers"),
    ("127.0.0.1:7000", '"[::]:7000"', ":6: nodes.alice.listen: :: is not an address peers"),
    ("127.0.0.1:7000", "239.1.1.1:7000", ":6: nodes.alice.listen: 239.1.1.1 is a multicast"),
    ("127.0.0.1:7000", "[1, 2]", ":6: nodes.alice.listen: expected host:port; quote an IPv6"),
    (
        "127.0.0.1:7000",
        "[::1]:7000",
        ":6:14: not valid YAML: expected the node content, but found"
        " ':' (while parsing a flow node); quote an IPv6 host:port",
    ),
    ("udp: 7001", "udp: 0", ":7: nodes.alice.udp: 0 is out of range (must be from 1 to 65535)"),
    ("udp: 7001", "udp: 65536", ":7: nodes.alice.udp: 65536 is out of range"),
    ("udp: 7001", "udp: yes", ":7: nodes.alice.udp: 'yes' is not a whole number"),
    # tap
    (
        "name: mcmw0",
        "name: a-very-long-tap-name",
        ":9: nodes.alice.tap.name: 'a-very-long-tap-name' is not an interface name (1 to 15 characters)",
    ),
    ("name: mcmw0", "name: mc/mw", ":9: nodes.alice.tap.name: 'mc/mw' is not an interface name"),
    ("name: mcmw0", "name: 'mc mw'", ":9: nodes.alice.tap.name: 'mc mw' is not an interface"),
    ("name: mcmw0", "name: ''", ":9: nodes.alice.tap.name: '' is not an interface name"),
    ("name: mcmw0", "name: ..", ":9: nodes.alice.tap.name: '..' is not an interface name"),
    (
        "address: 169.254.1.1/16",
        "address: 169.254.1.1",
        ":10: nodes.alice.tap.address: '169.254.1.1' needs a prefix length",
    ),
    (
        "address: 169.254.1.1/16",
        "address: 169.254.1.1/33",
        ":10: nodes.alice.tap.address: '169.254.1.1/33' is not an IPv4 address/prefix",
    ),
    (
        "address: 169.254.1.1/16",
        "address: fe80::1/64",
        ":10: nodes.alice.tap.address: 'fe80::1/64' is not an IPv4 address/prefix",
    ),
    (
        "address: 169.254.1.1/16",
        "address: 169.254.0.0/16",
        ":10: nodes.alice.tap.address: 169.254.0.0 is the network address of 169.254.0.0/16",
    ),
    (
        "address: 169.254.1.1/16",
        "address: 169.254.255.255/16",
        ":10: nodes.alice.tap.address: 169.254.255.255 is the broadcast address",
    ),
    (
        "address: 169.254.1.1/16",
        "address: 224.0.0.1/4",
        ":10: nodes.alice.tap.address: 224.0.0.1 cannot be an interface address",
    ),
    (
        "address: 169.254.1.2/16}",
        "address: 169.254.1.2/16, mtu: 575}",
        ":15: nodes.bob.tap.mtu: 575 is out of range (must be from 576 to 9000)",
    ),
    (
        "address: 169.254.1.2/16}",
        "address: 169.254.1.2/16, mtu: 9001}",
        ":15: nodes.bob.tap.mtu: 9001 is out of range",
    ),
    (
        "address: 169.254.1.2/16}",
        "address: 169.254.1.2/16, ipv6_scopes: [5, 10]}",
        ":15: nodes.bob.tap.ipv6_scopes[1]: '10' is not a hex scope digit",
    ),
    (
        "address: 169.254.1.2/16}",
        "address: 169.254.1.2/16, ipv6_scopes: [2]}",
        ":15: nodes.bob.tap.ipv6_scopes[0]: scope 2 is link-local; it is never carried",
    ),
    (
        "address: 169.254.1.2/16}",
        "address: 169.254.1.2/16, ipv6_scopes: [f]}",
        ":15: nodes.bob.tap.ipv6_scopes[0]: scope f is reserved",
    ),
    (
        "address: 169.254.1.2/16}",
        "address: 169.254.1.2/16, ipv6_scopes: [e, E]}",
        ":15: nodes.bob.tap.ipv6_scopes[1]: scope e is listed twice",
    ),
    (
        "address: 169.254.1.2/16}",
        "address: 169.254.1.2/16, ipv6_scopes: e}",
        ":15: nodes.bob.tap.ipv6_scopes: expected a list of hex scope digits",
    ),
    # igmp / mld
    (
        "{version: 3,",
        "{version: 4,",
        ":11: nodes.alice.igmp.version: 4 is out of range (must be from 1 to 3)",
    ),
    ("{version: 3,", "{version: 0,", ":11: nodes.alice.igmp.version: 0 is out of range"),
    (
        "mld: {version: 2}",
        "mld: {version: 3}",
        ":12: nodes.alice.mld.version: 3 is out of range (must be from 1 to 2)",
    ),
    (
        "robustness: 2}",
        "robustness: 0}",
        ":11: nodes.alice.igmp.robustness: 0 is out of range (must be 1 or more)",
    ),
    (
        "robustness: 2}",
        "robustness: two}",
        ":11: nodes.alice.igmp.robustness: 'two' is not a whole",
    ),
    (
        "robustness: 2}",
        "robustness: 2, query_response_interval: 125s}",
        ":11: nodes.alice.igmp.query_response_interval: query_response_interval (125s) must be"
        " shorter than query_interval (125s)",
    ),
    (
        "query_interval: 125s",
        "query_interval: 8s",
        ":11: nodes.alice.igmp.query_interval: query_response_interval (10s, the default) must be"
        " shorter than query_interval (8s)",
    ),
    (
        "{version: 3,",
        "{version: 2, query_response_interval: 26s,",
        ":11: nodes.alice.igmp.query_response_interval: 26s is longer than an IGMPv2 query can carry (25.5s)",
    ),
    (
        "query_interval: 125s",
        "query_interval: 9h",
        ":11: nodes.alice.igmp.query_interval: 32400s is longer than an IGMPv3 query can carry",
    ),
    (
        "mld: {version: 2}",
        "mld: {version: 1, last_member_query_interval: 70s}",
        ":12: nodes.alice.mld.last_member_query_interval: 70s is longer than an MLDv1 query",
    ),
    (
        "mld: {version: 2}",
        "mld: {last_member_query_count: 0}",
        ":12: nodes.alice.mld.last_member_query_count: 0 is out of range",
    ),
    (
        "mld: {version: 2}",
        "mld: {startup_query_count: -1}",
        ":12: nodes.alice.mld.startup_query_count: -1 is out of range",
    ),
    (
        "mld: {version: 2}",
        "mld: {startup_query_interval: 0ms}",
        ":12: nodes.alice.mld.startup_query_interval: '0ms' must be longer than zero",
    ),
    ("mld: {version: 2}", "mld: {max_groups: 0}", ":12: nodes.alice.mld.max_groups: 0 is out of"),
    (
        "mld: {version: 2}",
        "mld: {max_sources: many}",
        ":12: nodes.alice.mld.max_sources: 'many' is not a whole number",
    ),
    # links and the tree
    (
        "[alice, bob]",
        "[alice, carol]",
        ":17: links[0]: unknown node 'carol' (the nodes are alice, bob)",
    ),
    ("[alice, bob]", "[alice, alice]", ":17: links[0]: links node 'alice' to itself"),
    (
        "[alice, bob]",
        "[alice, bob]\n  - [bob, alice]",
        ":18: links[1]: bob and alice are already linked by links[0] (line 17)",
    ),
    (
        "links:\n  - [alice, bob]",
        "links: []",
        ":13: nodes.bob: not connected to the tree: no links lead from alice to bob",
    ),
    (
        "listen: 127.0.0.1:7010",
        "listen: 127.0.0.1:7000",
        ":14: nodes.bob.listen: 127.0.0.1:7000 is also the listen address of alice",
    ),
    (
        "address: 169.254.1.2/16",
        "address: 169.254.1.1/16",
        ":15: nodes.bob.tap.address: 169.254.1.1 is also the TAP address of alice",
    ),
    (
        "address: 169.254.1.2/16",
        "address: 10.9.0.1/16",
        ":15: nodes.bob.tap.address: 10.9.0.1/16 is not in the tree's TAP subnet 169.254.0.0/16 (from alice)",
    ),
    (
        "address: 169.254.1.2/16",
        "address: 169.254.1.2/24",
        ":15: nodes.bob.tap.address: 169.254.1.2/24 is not in the tree's TAP subnet",
    ),
    (
        "name: mcmw1",
        "name: mcmw0",
        ":15: nodes.bob.tap.name: 'mcmw0' is also the TAP of alice, which runs on the same host",
    ),
    (
        "tap: {name: mcmw1",
        "udp: 7001\n    tap: {name: mcmw1",
        ":15: nodes.bob.udp: UDP port 7001 on 127.0.0.1 is also used by alice",
    ),
    (
        "listen: 127.0.0.1:7010",
        "listen: 169.254.9.9:7010",
        ":14: nodes.bob.listen: 169.254.9.9 is inside the TAP subnet 169.254.0.0/16",
    ),
]


@pytest.mark.parametrize(("old", "new", "expected"), CASES, ids=[c[2][:60] for c in CASES])
def test_rule(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert error_of(tmp_path, edit(old, new)).startswith(expected)


def test_secret_file_empty_and_directory(tmp_path: Path) -> None:
    (tmp_path / "empty.key").write_text("\n")
    (tmp_path / "keys").mkdir()
    for name, why in (("empty.key", "is empty"), ("keys", "is a directory")):
        text = edit("  mapping: modulo\n", f"  mapping: modulo\n  secret_file: {name}\n")
        assert error_of(tmp_path, text).startswith(f":4: overlay.secret_file: '{name}' {why}")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("short\n", "'psk.key' line 1: key 1 is shorter than 16 characters"),
        (
            "1 0123456789abcdef\nnot a key line\n",
            "'psk.key' line 2: expected 'KEYID SECRET' (key id 1 to 2^32-1)",
        ),
        ("1 0123456789abcdef\n1 fedcba9876543210\n", "'psk.key' line 2: key id 1 appears twice"),
        ("0 0123456789abcdef\n", "'psk.key' line 1: expected 'KEYID SECRET' (key id 1 to 2^32-1)"),
        ("# only a comment\n", "'psk.key': no key in the file"),
    ],
)
def test_secret_file_holds_keys_the_node_accepts(tmp_path: Path, content: str, why: str) -> None:
    """`check` reads the key file as `run` will, so a file it accepts never stops a node."""
    (tmp_path / "psk.key").write_text(content)
    text = edit("  mapping: modulo\n", "  mapping: modulo\n  secret_file: psk.key\n")
    assert error_of(tmp_path, text) == f":4: overlay.secret_file: {why}"


def test_two_keys_for_a_roll(tmp_path: Path) -> None:
    (tmp_path / "psk.key").write_text("# new key first: it signs; the old one is still accepted\n"
                                      "2 the-new-key-0123456789\n1 the-old-key-0123456789\n")
    (tmp_path / "psk.key").chmod(0o600)
    text = edit("  mapping: modulo\n", "  mapping: modulo\n  secret_file: psk.key\n")
    assert load_tree(write(tmp_path, text)).overlay.secret_file == tmp_path / "psk.key"


def test_boundaries_and_udp_max_message(tmp_path: Path) -> None:
    text = edit("    udp: 7001\n", "    udp: 7001\n    boundaries: [239.192.0.0/14, ff05::/16]\n")
    text = edit("  mapping: modulo\n", "  mapping: modulo\n  udp_max_message: 1200\n", text)
    tree = load_tree(write(tmp_path, text))
    assert tree.nodes["alice"].boundaries == (
        ipaddress.ip_network("239.192.0.0/14"),
        ipaddress.ip_network("ff05::/16"),
    )
    assert tree.nodes["bob"].boundaries == ()
    assert tree.overlay.udp_max_message == 1200


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("    udp: 7001\n", "    udp: 7001\n    boundaries: [10.0.0.0/8]\n",
         ":8: nodes.alice.boundaries[0]: '10.0.0.0/8' is not a multicast prefix"),
        ("    udp: 7001\n", "    udp: 7001\n    boundaries: [239.192.0.0/33]\n",
         ":8: nodes.alice.boundaries[0]: '239.192.0.0/33' is not a prefix"),
        ("    udp: 7001\n", "    udp: 7001\n    boundaries: 239.192.0.0/14\n",
         ":8: nodes.alice.boundaries: expected a list"),
        ("  mapping: modulo\n", "  mapping: modulo\n  udp_max_message: 511\n",
         ":4: overlay.udp_max_message: 511 is out of range"),
        ("  mapping: modulo\n", "  mapping: modulo\n  udp_max_message: 65508\n",
         ":4: overlay.udp_max_message: 65508 is out of range"),
    ],
)
def test_boundaries_and_udp_max_message_rules(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert error_of(tmp_path, edit(old, new)).startswith(expected)


def test_cycle_names_the_closing_link(tmp_path: Path) -> None:
    text = FOUR + "links: [[a, b], [b, c], [c, d], [d, b]]\n"
    assert error_of(tmp_path, text) == (
        ":6: links[3]: [d, b] closes the cycle d-b-c-d; the tree must be cycle-free"
    )


def test_cycle_in_block_list(tmp_path: Path) -> None:
    text = FOUR + "links:\n  - [a, b]\n  - [b, c]\n  - [c, d]\n  - [a, c]\n"
    assert error_of(tmp_path, text).startswith(":10: links[3]: [a, c] closes the cycle a-c-b-a")


def test_disconnected_island(tmp_path: Path) -> None:
    text = FOUR + "links: [[a, b], [c, d]]\n"
    assert error_of(tmp_path, text) == (
        ":4: nodes.c: not connected to the tree: no links lead from a to c (it is linked only with d)"
    )


def test_a_tree_of_four(tmp_path: Path) -> None:
    tree = load_tree(write(tmp_path, FOUR + "links: [[a, b], [c, b], [d, c]]\n"))
    assert tree.neighbours("b") == [("a", False), ("c", False)]
    assert tree.neighbours("c") == [("b", True), ("d", False)]


def test_nodes_must_not_be_empty(tmp_path: Path) -> None:
    assert error_of(tmp_path, "nodes: {}\nlinks: []\n").startswith(":1: nodes: no nodes")


# --- the file itself -----------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file$"):
        load_tree(tmp_path / "nope.yaml")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_tree(tmp_path)


def test_unreadable_file() -> None:
    """What a user who may not read the file sees from `mcmw check`. Root reads any file,
    so as root the check runs as nobody (in a directory nobody may enter)."""
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        path = Path(directory) / "tree.yaml"
        path.write_text(BASE)
        path.chmod(0)
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        result = subprocess.run(
            [*drop, sys.executable, "-m", "mcmw", "check", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert result.stderr == f"mcmw check: {path}: cannot read: Permission denied\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ": the file is empty"),
        ("# only a comment\n", ": the file is empty"),
        ("- a\n- b\n", ":1: the top level must be a mapping with keys overlay, nodes and links"),
        ("just text\n", ":1: the top level must be a mapping"),
        (
            "nodes: [a\n",
            ":2:1: not valid YAML: expected ',' or ']', but got '<stream end>'"
            " (while parsing a flow sequence)",
        ),
        ("nodes:\n  a: b\n c: d\n", ":3:2: not valid YAML: expected <block end>"),
        (
            "a: 1\n---\nb: 2\n",
            ":2:1: not valid YAML: expected a single document in the stream but found another",
        ),
        ("a: *nothing\n", ":1:4: not valid YAML: found undefined alias"),
        ("\tnodes: {}\n", ":1:1: not valid YAML: found character '\\t'"),
    ],
)
def test_not_a_tree(tmp_path: Path, text: str, expected: str) -> None:
    assert error_of(tmp_path, text).startswith(expected)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "tree.yaml"
    path.write_bytes(b"nodes: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_tree(path)


def test_deep_nesting(tmp_path: Path) -> None:
    error_of(tmp_path, "nodes: " + "[" * 5000 + "]" * 5000 + "\n")


# --- no input ends in a traceback -------------------------------------------------------


def _only_config_errors(path: Path) -> None:
    try:
        load_tree(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_trees_fail_cleanly(tmp_path: Path, data: st.DataObject) -> None:
    lines = BASE.splitlines(keepends=True)
    index = data.draw(st.integers(0, len(lines) - 1))
    alphabet = st.sampled_from(list("ab:-[]{},&*<>!|%@`'\"#\t\n 0123456789./x"))
    lines[index] = data.draw(st.text(alphabet, max_size=30)) + "\n"
    path = tmp_path / "fuzz.yaml"
    path.write_text("".join(lines))
    _only_config_errors(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_random_bytes_fail_cleanly(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(blob)
    _only_config_errors(path)


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["alice", "bob", "125s", "169.254.1.3/16", "127.0.0.1:7020", "[]"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_odd_values_fail_cleanly(tmp_path: Path, data: st.DataObject) -> None:
    tree = yaml.safe_load(BASE)
    for _ in range(data.draw(st.integers(1, 3))):
        # Walk to a random place in the tree and put an odd value there.
        here = tree
        while True:
            keys = list(here) if isinstance(here, dict) else list(range(len(here)))
            key = data.draw(st.sampled_from(keys))
            child = here[key]
            if not isinstance(child, dict | list) or not child or data.draw(st.booleans()):
                here[key] = data.draw(_VALUES)
                break
            here = child
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(tree))
    _only_config_errors(path)
