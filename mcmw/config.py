"""The tree file: load, validate, and describe one node's view of the tree.

`load_tree` reads the YAML as a node tree (yaml.compose) rather than as Python
objects, so that every error can name the line it comes from, and it reads the raw
text of every scalar itself, so that YAML 1.1 surprises (`1:30` is 90, `0x10` is 16,
`on` is True) never reach the configuration. Errors are raised as ConfigError with
one line `FILE:LINE: KEY.PATH: what is wrong`, for the first error found.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from igmp.params import IGMP_DEFAULTS, MLD_DEFAULTS, QuerierParams
from mcmw.mapping import MAPPINGS
from overlay.auth import KeyFileError, load_keys

__all__ = [
    "MAPPINGS",
    "ConfigError",
    "Link",
    "NodeConfig",
    "OverlayConfig",
    "TapConfig",
    "TreeConfig",
    "load_tree",
    "parse_duration",
]

TTL_MODES = ("hop", "link")
DURATION_HINT = "(write 125s, 500ms or 2m)"
MTU_RANGE = (576, 9000)
NODE_NAME_MAX = 64


WIRE_BITS = 32  # overlay addresses travel as 32-bit fields (docs/protocol.md)


class ConfigError(Exception):
    """A tree file is invalid. str() is one line: 'FILE:LINE: KEY: what is wrong'."""

    def __init__(self, message: str, *, line: int | None = None, key: str = "") -> None:
        super().__init__(_one_line(message))
        self.line = line  # 1-based; None when the error is about the file as a whole
        self.key = key  # the key path, e.g. "nodes.bob.igmp.query_interval"


@dataclass(frozen=True)
class TapConfig:
    name: str
    address: ipaddress.IPv4Interface
    mtu: int = 1500
    # IPv6 multicast scopes routed into the TAP (ff0X::/16 for each X listed).
    ipv6_scopes: tuple[int, ...] = (0x3, 0x4, 0x5, 0x8, 0xE)
    # An existing Linux bridge to enslave the TAP to, so that mcmw serves a real LAN.
    bridge: str | None = None


@dataclass(frozen=True)
class NodeConfig:
    name: str
    listen: tuple[str, int]  # (IP address without brackets, TCP port)
    tap: TapConfig
    udp: int | None = None
    igmp: QuerierParams = IGMP_DEFAULTS
    mld: QuerierParams = MLD_DEFAULTS
    # Administratively scoped prefixes this node never carries across its links.
    boundaries: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class OverlayConfig:
    address_bits: int = 24
    mapping: str = "modulo"
    secret_file: Path | None = None  # absolute, resolved against the tree file's directory
    ttl: str = "hop"  # "hop": each overlay hop decrements; "link": the overlay is one link
    keepalive_interval: float = 3.0
    dead_interval: float = 10.0
    # The largest UDP datagram sent, Integrity object included; bigger IP-Data goes in
    # fragments that each fit, so no datagram is IP-fragmented on a 1500-byte path.
    udp_max_message: int = 1400


@dataclass(frozen=True)
class Link:
    dialer: str
    acceptor: str


@dataclass(frozen=True)
class TreeConfig:
    path: Path
    overlay: OverlayConfig
    nodes: dict[str, NodeConfig]
    links: tuple[Link, ...] = field(default_factory=tuple)
    # Valid but doubtful settings, each one line 'FILE:LINE: KEY: why', for the operator.
    warnings: tuple[str, ...] = ()

    def neighbours(self, name: str) -> list[tuple[str, bool]]:
        """The peers of node `name`, each with True when `name` dials that link."""
        result: list[tuple[str, bool]] = []
        for link in self.links:
            if link.dialer == name:
                result.append((link.acceptor, True))
            elif link.acceptor == name:
                result.append((link.dialer, False))
        return result


def load_tree(path: str | Path) -> TreeConfig:
    """Read and validate a tree file; raise ConfigError with a one-line message."""
    return _TreeReader(Path(path)).read()


def _one_line(text: str) -> str:
    """`text` with control characters escaped, so that a message stays one line
    whatever keys, values or file names it quotes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# --- durations --------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in `text`: `125s`, `500ms`, `2m`, `1h`, or a bare number of seconds.

    Raises ValueError for anything else (negative, signed or exponent forms included).
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"'{text}' is not a duration {DURATION_HINT}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _show_seconds(seconds: float) -> str:
    """A duration as an operator would write it, for messages."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


# --- querier limits ------------------------------------------------------------------

# The largest Max Response Time each query format can carry, in seconds:
# IGMPv2 8 bits of 1/10 s; IGMPv3 Max Resp Code (RFC 3376 4.1.1) up to 31744 tenths;
# MLDv1 16 bits of ms; MLDv2 Maximum Response Code (RFC 3810 5.1.3) up to 8387584 ms.
# IGMPv1 queries carry none (hosts use a fixed 10 s), so nothing limits it.
_MAX_RESPONSE: dict[tuple[str, int], float] = {
    ("igmp", 2): 25.5,
    ("igmp", 3): 3174.4,
    ("mld", 1): 65.535,
    ("mld", 2): 8387.584,
}
# The largest Querier's Query Interval Code (IGMPv3 QQIC, MLDv2 QQIC): 31744 s.
_MAX_QUERY_INTERVAL: dict[tuple[str, int], float] = {("igmp", 3): 31744.0, ("mld", 2): 31744.0}
_MAX_VERSION = {"igmp": 3, "mld": 2}
_QUERIER_DURATIONS = (
    "query_interval",
    "query_response_interval",
    "last_member_query_interval",
    "startup_query_interval",
)
_QUERIER_COUNTS = (
    "robustness",
    "last_member_query_count",
    "startup_query_count",
    "max_groups",
    "max_sources",
)
_QUERIER_KEYS = ("version", *_QUERIER_DURATIONS, *_QUERIER_COUNTS)


# --- the reader --------------------------------------------------------------------

_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_INT = re.compile(r"[+-]?\d+")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<v4>[^:\[\]]*)):(?P<port>[^:]*)")


@dataclass(frozen=True)
class _At:
    """A YAML node, the key path that leads to it, and the line to blame for it."""

    node: yaml.Node
    path: str
    line: int


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == _NULL_TAG:
        return "nothing"
    return f"'{node.value}'"


def _line_of(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _TreeReader:
    """Walks the composed YAML of one tree file, checking as it builds the config."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = str(path)
        self.warnings: list[str] = []

    # -- reporting

    def fail(self, at: _At, message: str) -> ConfigError:
        prefix = f"{self.file}:{at.line}: {at.path}: " if at.path else f"{self.file}:{at.line}: "
        return ConfigError(prefix + message, line=at.line, key=at.path)

    def warn(self, at: _At, message: str) -> None:
        self.warnings.append(_one_line(f"{self.file}:{at.line}: {at.path}: {message}"))

    # -- the file

    def read(self) -> TreeConfig:
        root = self.compose()
        top = self.mapping(_At(root, "", _line_of(root)), ("nodes", "links"), ("overlay",))
        overlay = self.overlay(top["overlay"]) if "overlay" in top else OverlayConfig()
        nodes, node_keys = self.nodes(top["nodes"])
        links = self.links(top["links"], nodes)
        self.check_tree(nodes, node_keys, links)
        return TreeConfig(
            path=self.path,
            overlay=overlay,
            nodes=nodes,
            links=tuple(link for link, _ in links),
            warnings=tuple(self.warnings),
        )

    def compose(self) -> yaml.Node:
        try:
            text = self.path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{self.file}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"{self.file}: is a directory, not a tree file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{self.file}: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"{self.file}: cannot read: {exc.strerror or exc}") from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{self.file}:{mark.line + 1}:{mark.column + 1}" if mark else self.file
            line = mark.line + 1 if mark else None
            lines = text.splitlines()
            source = lines[line - 1] if line and line <= len(lines) else ""
            what = _yaml_problem(exc, source)
            raise ConfigError(f"{where}: not valid YAML: {what}", line=line) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.file}: not valid YAML: {' '.join(str(exc).split())}") from None
        except RecursionError:
            raise ConfigError(f"{self.file}: not valid YAML: nested too deeply") from None
        if root is None:
            raise ConfigError(f"{self.file}: the file is empty; a tree needs nodes: and links:")
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(
                f"{self.file}:{_line_of(root)}: the top level must be a mapping with keys "
                f"overlay, nodes and links, not {_kind(root)}",
                line=_line_of(root),
            )
        return root

    # -- generic shapes

    def mapping(self, at: _At, required: Iterable[str], optional: Iterable[str] = ()) -> dict[str, _At]:
        """The entries of a mapping with fixed keys, each as an _At; none unknown or missing."""
        required, optional = tuple(required), tuple(optional)
        entries = self.entries(at)
        allowed = required + optional
        for key, child in entries.items():
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                expected = f"did you mean '{hint[0]}'?" if hint else "expected " + ", ".join(allowed)
                raise self.fail(replace(child, path=_join(at.path, key)), f"unknown key ({expected})")
        for key in required:
            if key not in entries:
                raise self.fail(replace(at, path=_join(at.path, key)), "missing (required)")
        return entries

    def entries(self, at: _At) -> dict[str, _At]:
        """A mapping's entries in file order, keyed by the raw text of each key."""
        node = at.node
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(at, f"expected a mapping of keys, found {_kind(node)}")
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(replace(at, line=_line_of(key_node)), "a key must be plain text")
            key = key_node.value
            if key in seen:
                raise self.fail(
                    _At(key_node, _join(at.path, key), _line_of(key_node)),
                    f"duplicate key (first given on line {seen[key]})",
                )
            seen[key] = _line_of(key_node)
        try:
            # `<<: *anchor` merges: PyYAML's own flattening, explicit keys win.
            yaml.constructor.SafeConstructor().flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            raise self.fail(at, " ".join(str(exc.problem).split())) from None
        result: dict[str, _At] = {}
        for key_node, value in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(replace(at, line=_line_of(key_node)), "a key must be plain text")
            key = key_node.value
            # Blame a scalar's own line, but a block's key line (a block starts below it).
            plain = isinstance(value, yaml.ScalarNode) and value.tag != _NULL_TAG
            line = _line_of(value) if plain else _line_of(key_node)
            result[key] = _At(value, _join(at.path, key), line)
        return result

    def items(self, at: _At, what: str) -> list[_At]:
        if not isinstance(at.node, yaml.SequenceNode):
            raise self.fail(at, f"expected a list of {what}, found {_kind(at.node)}")
        return [_At(item, f"{at.path}[{i}]", _line_of(item)) for i, item in enumerate(at.node.value)]

    def text(self, at: _At) -> str:
        node = at.node
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            raise self.fail(at, f"expected a single value, found {_kind(node)}")
        if node.tag == _NULL_TAG:
            raise self.fail(at, "has no value")
        return node.value.strip()

    def integer(self, at: _At, low: int, high: int | None = None) -> int:
        text = self.text(at)
        if not _INT.fullmatch(text):
            raise self.fail(at, f"'{text}' is not a whole number")
        value = int(text)
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise self.fail(at, f"{value} is out of range (must be {bounds})")
        return value

    def duration(self, at: _At) -> float:
        text = self.text(at)
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            raise self.fail(at, str(exc)) from None
        if seconds <= 0:
            raise self.fail(at, f"'{text}' must be longer than zero")
        return seconds

    def choice(self, at: _At, choices: tuple[str, ...]) -> str:
        text = self.text(at)
        if text not in choices:
            raise self.fail(at, f"'{text}' is not one of {', '.join(choices)}")
        return text

    # -- overlay

    def overlay(self, at: _At) -> OverlayConfig:
        keys = self.mapping(
            at,
            (),
            (
                "address_bits",
                "mapping",
                "secret_file",
                "ttl",
                "keepalive_interval",
                "dead_interval",
                "udp_max_message",
            ),
        )
        defaults = OverlayConfig()
        bits = (
            self.integer(keys["address_bits"], 1, WIRE_BITS)
            if "address_bits" in keys
            else defaults.address_bits
        )
        mapping = self.choice(keys["mapping"], MAPPINGS) if "mapping" in keys else defaults.mapping
        if mapping == "identity" and bits < 32:
            blame = keys.get("address_bits") or keys["mapping"]
            raise self.fail(
                blame,
                f"identity mapping needs address_bits 32 or more (IPv4 groups are 32 bits), not {bits}",
            )
        secret = self.secret_file(keys["secret_file"]) if "secret_file" in keys else None
        ttl = self.choice(keys["ttl"], TTL_MODES) if "ttl" in keys else defaults.ttl
        keepalive = (
            self.duration(keys["keepalive_interval"])
            if "keepalive_interval" in keys
            else defaults.keepalive_interval
        )
        dead = self.duration(keys["dead_interval"]) if "dead_interval" in keys else defaults.dead_interval
        if keepalive >= dead:
            blame = keys.get("keepalive_interval") or keys["dead_interval"]
            raise self.fail(
                blame,
                f"keepalive_interval ({_show_seconds(keepalive)}) must be shorter than "
                f"dead_interval ({_show_seconds(dead)}), or every quiet link dies",
            )
        udp_max = (
            self.integer(keys["udp_max_message"], 512, 65507)
            if "udp_max_message" in keys
            else defaults.udp_max_message
        )
        return OverlayConfig(
            address_bits=bits,
            mapping=mapping,
            secret_file=secret,
            ttl=ttl,
            keepalive_interval=keepalive,
            dead_interval=dead,
            udp_max_message=udp_max,
        )

    def secret_file(self, at: _At) -> Path:
        text = self.text(at)
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.path.absolute().parent / path  # relative to the tree, not to the cwd
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self.fail(at, f"'{text}' does not exist (looked for {path})") from None
        except IsADirectoryError:
            raise self.fail(at, f"'{text}' is a directory, not a key file") from None
        except OSError as exc:
            raise self.fail(at, f"cannot read '{text}': {exc.strerror or exc}") from None
        if not data.strip():
            raise self.fail(at, f"'{text}' is empty; it must hold the shared key")
        try:
            # Read as the node will: a file `check` accepts must never stop `run`.
            load_keys(path)
        except KeyFileError as exc:
            why = re.sub(r"^(\d+):", r"line \1:", str(exc).removeprefix(f"{path}:").strip())
            raise self.fail(at, f"'{text}'{' ' if why.startswith('line') else ': '}{why}") from None
        if path.stat().st_mode & 0o077:
            self.warn(at, f"'{text}' can be read by other users (chmod 600 {path})")
        return path

    # -- nodes

    def nodes(self, at: _At) -> tuple[dict[str, NodeConfig], dict[str, _At]]:
        entries = self.entries(at)
        if not entries:
            raise self.fail(at, "no nodes; a tree needs at least one")
        nodes: dict[str, NodeConfig] = {}
        for name, node_at in entries.items():
            if not _NODE_NAME.fullmatch(name) or len(name) > NODE_NAME_MAX:
                raise self.fail(
                    node_at,
                    f"node name '{name}' must start with a letter or digit and hold only "
                    f"letters, digits, '.', '_' and '-' (at most {NODE_NAME_MAX}): "
                    "it names the control socket",
                )
            nodes[name] = self.node(name, node_at)
        return nodes, entries

    def node(self, name: str, at: _At) -> NodeConfig:
        keys = self.mapping(at, ("listen", "tap"), ("udp", "igmp", "mld", "boundaries"))
        listen = self.host_port(keys["listen"])
        udp = self.integer(keys["udp"], 1, 65535) if "udp" in keys else None
        tap = self.tap(keys["tap"])
        igmp = self.querier(keys["igmp"], "igmp", IGMP_DEFAULTS) if "igmp" in keys else IGMP_DEFAULTS
        mld = self.querier(keys["mld"], "mld", MLD_DEFAULTS) if "mld" in keys else MLD_DEFAULTS
        boundaries = self.boundaries(keys["boundaries"]) if "boundaries" in keys else ()
        return NodeConfig(
            name=name, listen=listen, tap=tap, udp=udp, igmp=igmp, mld=mld, boundaries=boundaries
        )

    def boundaries(self, at: _At) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        result = []
        for item in self.items(at, "multicast prefixes"):
            text = self.text(item)
            try:
                network = ipaddress.ip_network(text)
            except ValueError:
                example = "write 239.192.0.0/14 or ff05::/16"
                raise self.fail(item, f"'{text}' is not a prefix ({example})") from None
            if not network.is_multicast:
                raise self.fail(item, f"'{text}' is not a multicast prefix")
            result.append(network)
        return tuple(result)

    def host_port(self, at: _At) -> tuple[str, int]:
        if isinstance(at.node, yaml.SequenceNode):
            # `listen: [::1]:7000` reads as a YAML list; say how to write it.
            raise self.fail(at, 'expected host:port; quote an IPv6 address: "[::1]:7000"')
        text = self.text(at)
        usage = f"'{text}' is not host:port (write 127.0.0.1:7000 or \"[::1]:7000\")"
        match = _HOST_PORT.fullmatch(text)
        if match is None:
            raise self.fail(at, usage)
        host = match.group("v6") if match.group("v6") is not None else match.group("v4")
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = (
                ipaddress.IPv6Address(host) if match.group("v6") is not None else ipaddress.IPv4Address(host)
            )
        except ValueError:
            raise self.fail(at, usage) from None
        port_text = match.group("port")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise self.fail(at, f"port '{port_text}' is not a port number (1 to 65535)")
        if address.is_unspecified:
            raise self.fail(at, f"{address} is not an address peers can dial; write this node's own address")
        if address.is_multicast:
            raise self.fail(at, f"{address} is a multicast address; write this node's own address")
        return str(address), int(port_text)

    def tap(self, at: _At) -> TapConfig:
        keys = self.mapping(at, ("name", "address"), ("mtu", "ipv6_scopes", "bridge"))
        name = self.ifname(keys["name"])
        address = self.tap_address(keys["address"])
        defaults = TapConfig(name, address)
        mtu = self.integer(keys["mtu"], *MTU_RANGE) if "mtu" in keys else defaults.mtu
        if mtu < 1280:
            self.warn(
                keys["mtu"],
                f"MTU {mtu} is below IPv6's minimum of 1280; MLD and IPv6 groups will not work",
            )
        scopes = self.scopes(keys["ipv6_scopes"]) if "ipv6_scopes" in keys else defaults.ipv6_scopes
        bridge = self.ifname(keys["bridge"]) if "bridge" in keys else None
        return TapConfig(name=name, address=address, mtu=mtu, ipv6_scopes=scopes, bridge=bridge)

    def ifname(self, at: _At) -> str:
        # Linux dev_valid_name(): 1 to IFNAMSIZ-1 bytes, not . or .., no '/', ':' or space.
        name = self.text(at)
        if not name or len(name.encode()) > 15:
            raise self.fail(at, f"'{name}' is not an interface name (1 to 15 characters)")
        if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
            raise self.fail(at, f"'{name}' is not an interface name (no '/', ':' or spaces)")
        return name

    def tap_address(self, at: _At) -> ipaddress.IPv4Interface:
        text = self.text(at)
        if "/" not in text:
            raise self.fail(at, f"'{text}' needs a prefix length, such as 169.254.1.1/16")
        try:
            address = ipaddress.IPv4Interface(text)
        except ValueError:
            raise self.fail(at, f"'{text}' is not an IPv4 address/prefix, such as 169.254.1.1/16") from None
        ip, net = address.ip, address.network
        if ip.is_multicast or ip.is_unspecified or ip.is_loopback:
            raise self.fail(at, f"{ip} cannot be an interface address")
        if net.prefixlen < 31 and ip in (net.network_address, net.broadcast_address):
            raise self.fail(
                at,
                f"{ip} is the {'network' if ip == net.network_address else 'broadcast'} address of {net}",
            )
        return address

    def scopes(self, at: _At) -> tuple[int, ...]:
        scopes: list[int] = []
        for item in self.items(at, "hex scope digits, such as [5, 8, e]"):
            text = self.text(item)
            digit = text[2:] if text.lower().startswith("0x") else text
            if len(digit) != 1 or digit not in "0123456789abcdefABCDEF":
                raise self.fail(item, f"'{text}' is not a hex scope digit (3 to e)")
            scope = int(digit, 16)
            if scope in (1, 2):
                raise self.fail(
                    item,
                    f"scope {scope:x} is {'interface' if scope == 1 else 'link'}-local; it is never carried",
                )
            if scope in (0, 15):
                raise self.fail(item, f"scope {scope:x} is reserved (RFC 4291 2.7)")
            if scope in scopes:
                raise self.fail(item, f"scope {scope:x} is listed twice")
            scopes.append(scope)
        return tuple(scopes)

    def querier(self, at: _At, proto: str, defaults: QuerierParams) -> QuerierParams:
        keys = self.mapping(at, (), _QUERIER_KEYS)
        values: dict[str, float | int] = {}
        if "version" in keys:
            values["version"] = self.integer(keys["version"], 1, _MAX_VERSION[proto])
        for key in _QUERIER_DURATIONS:
            if key in keys:
                values[key] = self.duration(keys[key])
        for key in _QUERIER_COUNTS:
            if key in keys:
                values[key] = self.integer(keys[key], 1)
        params = replace(defaults, **values)

        def blame(*names: str) -> _At:
            """The first of `names` the operator wrote (the others hold defaults)."""
            return next(keys[n] for n in names if n in keys)

        def given(name: str) -> str:
            return "" if name in keys else ", the default"

        qi, qri = params.query_interval, params.query_response_interval
        if qri >= qi and ("query_interval" in keys or "query_response_interval" in keys):
            raise self.fail(
                blame("query_response_interval", "query_interval"),
                f"query_response_interval ({_show_seconds(qri)}{given('query_response_interval')}) "
                f"must be shorter than query_interval "
                f"({_show_seconds(qi)}{given('query_interval')})",
            )
        version = params.version
        limit = _MAX_RESPONSE.get((proto, version))
        for key in ("query_response_interval", "last_member_query_interval"):
            if limit is not None and key in keys and getattr(params, key) > limit:
                raise self.fail(
                    keys[key],
                    f"{_show_seconds(getattr(params, key))} is longer than an "
                    f"{proto.upper()}v{version} query can carry ({_show_seconds(limit)})",
                )
        limit = _MAX_QUERY_INTERVAL.get((proto, version))
        if limit is not None and "query_interval" in keys and qi > limit:
            raise self.fail(
                keys["query_interval"],
                f"{_show_seconds(qi)} is longer than an {proto.upper()}v{version} query can "
                f"carry ({_show_seconds(limit)})",
            )
        if "robustness" in keys and params.robustness == 1:
            self.warn(
                keys["robustness"],
                "robustness 1 leaves no margin for a lost packet (RFC 3376 8.1: should not be 1)",
            )
        return params

    # -- links and the tree as a whole

    def links(self, at: _At, nodes: dict[str, NodeConfig]) -> list[tuple[Link, _At]]:
        if at.node.tag == _NULL_TAG:
            raise self.fail(at, "has no value (write links: [] for a tree of one node)")
        links: list[tuple[Link, _At]] = []
        seen: dict[frozenset[str], _At] = {}
        known = ", ".join(nodes)
        for item in self.items(at, "[dialer, acceptor] pairs"):
            node = item.node
            if not isinstance(node, yaml.SequenceNode) or len(node.value) != 2:
                raise self.fail(item, "expected [dialer, acceptor], a list of two node names")
            ends = [self.text(_At(end, item.path, _line_of(end))) for end in node.value]
            for end in ends:
                if end not in nodes:
                    raise self.fail(item, f"unknown node '{end}' (the nodes are {known})")
            dialer, acceptor = ends
            if dialer == acceptor:
                raise self.fail(item, f"links node '{dialer}' to itself")
            pair = frozenset(ends)
            if pair in seen:
                first = seen[pair]
                raise self.fail(
                    item,
                    f"{dialer} and {acceptor} are already linked by {first.path} (line {first.line})",
                )
            seen[pair] = item
            links.append((Link(dialer, acceptor), item))
        return links

    def check_tree(
        self,
        nodes: dict[str, NodeConfig],
        node_keys: dict[str, _At],
        links: list[tuple[Link, _At]],
    ) -> None:
        def at(name: str, *keys: str) -> _At:
            """Where nodes.NAME.KEY... was written, for tree-wide errors."""
            place = node_keys[name]
            for key in keys:
                place = self.entries(place)[key]
            return place

        # A cycle: the first link whose ends are already joined closes one.
        adjacent: dict[str, list[str]] = {name: [] for name in nodes}
        for link, link_at in links:
            route = _path(adjacent, link.acceptor, link.dialer)
            if route is not None:
                cycle = "-".join([link.dialer, *route])
                raise self.fail(
                    link_at,
                    f"[{link.dialer}, {link.acceptor}] closes the cycle {cycle}; the tree must be cycle-free",
                )
            adjacent[link.dialer].append(link.acceptor)
            adjacent[link.acceptor].append(link.dialer)

        # A disconnected node: everything must be reachable from the first node.
        root = next(iter(nodes))
        reached = _reachable(adjacent, root)
        for name in nodes:
            if name not in reached:
                island = sorted(_reachable(adjacent, name) - {name})
                apart = f" (it is linked only with {', '.join(island)})" if island else ""
                raise self.fail(
                    node_keys[name],
                    f"not connected to the tree: no links lead from {root} to {name}{apart}",
                )

        listen: dict[tuple[str, int], str] = {}
        udp: dict[tuple[str, int], str] = {}
        tap_ip: dict[ipaddress.IPv4Address, str] = {}
        tap_name: dict[tuple[str, str], str] = {}
        first = next(iter(nodes.values()))
        subnet = first.tap.address.network
        for name, node in nodes.items():
            host, port = node.listen
            other = listen.setdefault(node.listen, name)
            if other != name:
                raise self.fail(at(name, "listen"), f"{host}:{port} is also the listen address of {other}")
            if node.udp is not None:
                other = udp.setdefault((host, node.udp), name)
                if other != name:
                    raise self.fail(at(name, "udp"), f"UDP port {node.udp} on {host} is also used by {other}")
            other = tap_ip.setdefault(node.tap.address.ip, name)
            if other != name:
                raise self.fail(
                    at(name, "tap", "address"),
                    f"{node.tap.address.ip} is also the TAP address of {other}",
                )
            # Nodes that listen on one IP run in one network namespace: one TAP name each.
            other = tap_name.setdefault((host, node.tap.name), name)
            if other != name:
                raise self.fail(
                    at(name, "tap", "name"),
                    f"'{node.tap.name}' is also the TAP of {other}, which runs on the same host ({host})",
                )
            # The kernel accepts forwarded packets only from sources on the TAP's subnet.
            if node.tap.address.network != subnet:
                raise self.fail(
                    at(name, "tap", "address"),
                    f"{node.tap.address} is not in the tree's TAP subnet {subnet} "
                    f"(from {first.name}); "
                    "all nodes' TAP addresses must share one subnet",
                )
            # Peer links routed into the TAP would carry the overlay inside itself.
            listen_ip = ipaddress.ip_address(host)
            if listen_ip.version == 4 and listen_ip in subnet:
                raise self.fail(
                    at(name, "listen"),
                    f"{host} is inside the TAP subnet {subnet}; peer links would be routed into the TAP",
                )


# `listen: [::1]:7000` unquoted: YAML reads `[` as the start of a list.
_BARE_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\]:")


def _yaml_problem(exc: yaml.MarkedYAMLError, source_line: str) -> str:
    """PyYAML's problem and context as one line, with a hint for a common slip."""
    problem, context = exc.problem or "", exc.context or ""
    if context.startswith("while"):
        what = f"{problem} ({context})" if problem else context
    else:
        what = f"{context} {problem}".strip()
    what = " ".join(what.split())  # the parser's messages may span lines
    if _BARE_IPV6.search(source_line):
        what += '; quote an IPv6 host:port, as in "[::1]:7000"'
    return what


def _reachable(adjacent: dict[str, list[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for peer in adjacent[todo.pop()]:
            if peer not in seen:
                seen.add(peer)
                todo.append(peer)
    return seen


def _path(adjacent: dict[str, list[str]], start: str, goal: str) -> list[str] | None:
    """The nodes from `start` to `goal` along links (both included), or None."""
    previous: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        here = todo.pop(0)
        if here == goal:
            route: list[str] = []
            step: str | None = here
            while step is not None:
                route.append(step)
                step = previous[step]
            return route[::-1]
        for peer in adjacent[here]:
            if peer not in previous:
                previous[peer] = here
                todo.append(peer)
    return None
