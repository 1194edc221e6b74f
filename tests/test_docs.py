"""The documentation tells the truth: the README's first commands, the protocol's hex
examples (plain and authenticated), and the tree-file keys of docs/configuration.md."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mcmw.config import ConfigError, load_tree, parse_duration
from overlay import codec
from overlay.auth import Authenticator, split_integrity
from overlay.codec import AddRoute, Close, IpData, KeepAlive, Open, RemoveRoute, Route

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PROTOCOL = ROOT / "docs" / "protocol.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"

README_COMMANDS = [
    "bash scripts/setup.sh && .venv/bin/mcmw demo",
    "bash scripts/setup.sh && .venv/bin/python -m pytest",
]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


# -- README -------------------------------------------------------------------------


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# "), "the README starts with its title line"
    rest = "\n".join(lines[1:]).lstrip("\n")
    assert rest.startswith("```"), "the first thing after the title is the fenced block"
    block = FENCE.search(rest)
    assert block is not None
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == README_COMMANDS


def test_readme_links_to_docs_that_exist() -> None:
    for target in re.findall(r"\]\((docs/[^)#]+)", README.read_text()):
        assert (ROOT / target).is_file(), target


# -- protocol examples --------------------------------------------------------------

EXAMPLE = re.compile(
    r"<!-- example: (?P<name>[A-Za-z-]+) -->\s*\n`(?P<expr>[^`\n]+)`\s*\n\s*```text\n(?P<hex>.*?)```",
    re.DOTALL,
)
CLASSES: dict[str, type] = {
    "Open": Open,
    "Keep-Alive": KeepAlive,
    "Add-Route": AddRoute,
    "Remove-Route": RemoveRoute,
    "IP-Data": IpData,
    "Close": Close,
}


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


NAMESPACE: dict[str, Any] = {
    "__builtins__": {},
    "bytes": bytes,
    "range": range,
    "ip": ip,
    "Route": Route,
    **{cls.__name__: cls for cls in CLASSES.values()},
}


def hex_bytes(block: str) -> bytes:
    """The bytes of an annotated hex block: per line, hex pairs before an optional `#`."""
    data = bytearray()
    for number, line in enumerate(block.splitlines(), start=1):
        pairs = line.split("#", 1)[0].split()
        for pair in pairs:
            assert re.fullmatch(r"[0-9a-fA-F]{2}", pair), f"line {number}: {pair!r} is not a hex byte"
        data += bytes.fromhex("".join(pairs))
    return bytes(data)


def examples() -> list[tuple[str, str, bytes]]:
    text = PROTOCOL.read_text()
    found = [(m["name"], m["expr"], hex_bytes(m["hex"])) for m in EXAMPLE.finditer(text)]
    assert len(found) == text.count("<!-- example:"), (
        "an example marker is not followed by `expr` and a hex block"
    )
    return found


def test_every_message_has_an_example() -> None:
    assert {name for name, _, _ in examples()} == set(CLASSES)


@pytest.mark.parametrize("index", range(len(examples())))
def test_hex_example_decodes_to_the_message_it_claims(index: int) -> None:
    name, expr, data = examples()[index]
    claimed = eval(expr, NAMESPACE)  # noqa: S307 - our own document, a fixed namespace
    assert isinstance(claimed, CLASSES[name]), f"{name} example is a {type(claimed).__name__}"
    assert codec.decode(data) == claimed, f"{name}: the hex does not decode to {expr}"
    assert codec.encode(claimed) == data, f"{name}: the encoder no longer writes these bytes"


# -- authenticated examples ---------------------------------------------------------

SEALED = re.compile(
    r"<!-- sealed-example: (?P<name>[A-Za-z -]+) -->\s*\n`(?P<expr>[^`\n]+)`\s*\n\s*```text\n(?P<hex>.*?)```",
    re.DOTALL,
)


def _seal_open(message: Any, key_id: int, secret: bytes) -> bytes:
    return Authenticator({key_id: secret}, bytes(16)).seal_open(codec.encode(message))


def _session_key(secret: bytes, dialer_nonce: bytes, acceptor_nonce: bytes) -> bytes:
    auth = Authenticator({1: secret}, bytes(16))
    auth.start_session(1, dialer_nonce, acceptor_nonce)
    assert auth.session_key is not None
    return auth.session_key


def _seal(message: Any, seq: int, key: bytes) -> bytes:
    auth = Authenticator({1: b"unused-pre-shared-key"}, bytes(16))
    auth.session_key = key
    return auth.seal_datagram(codec.encode(message), seq)


SEALED_NAMESPACE: dict[str, Any] = {
    **NAMESPACE,
    "seal_open": _seal_open,
    "session_key": _session_key,
    "seal": _seal,
}


def sealed_examples() -> list[tuple[str, str, bytes]]:
    text = PROTOCOL.read_text()
    found = [(m["name"], m["expr"], hex_bytes(m["hex"])) for m in SEALED.finditer(text)]
    assert len(found) == text.count("<!-- sealed-example:"), (
        "a sealed-example marker is not followed by `expr` and a hex block"
    )
    return found


def test_the_integrity_object_has_examples() -> None:
    names = {name for name, _, _ in sealed_examples()}
    assert {"Open", "session key", "Keep-Alive", "IP-Data"} <= names


@pytest.mark.parametrize("index", range(len(sealed_examples())))
def test_sealed_example_is_what_the_code_writes(index: int) -> None:
    name, expr, data = sealed_examples()[index]
    assert eval(expr, SEALED_NAMESPACE) == data, f"{name}: the code no longer writes these bytes"  # noqa: S307
    if name == "session key":
        return
    inner, key_id, seq, _ = split_integrity(data)
    assert isinstance(codec.decode(inner), CLASSES[name]), f"{name}: the sealed message is not a {name}"
    # The receiving side accepts it: pre-shared key for Open, session key otherwise.
    secret = re.search(r"secret=b'([^']+)'", expr)
    assert secret is not None
    keys = {1: secret.group(1).encode()}
    receiver = Authenticator(keys, bytes(16))
    if name == "Open":
        assert key_id == 1 and seq == 0
        assert receiver.unseal_open(data) == (inner, 1)
    else:
        assert key_id == 0
        receiver.start_session(1, bytes(range(16)), bytes(range(16, 32)))
        assert receiver.unseal_datagram(data) == inner


# -- configuration ------------------------------------------------------------------

BOGUS = "qqqqqqqq"


def complete_example() -> dict[str, Any]:
    text = CONFIGURATION.read_text()
    match = re.search(r"<!-- complete-example -->\s*\n```yaml\n(.*?)```", text, re.DOTALL)
    assert match is not None, "docs/configuration.md has no complete example"
    return yaml.safe_load(match.group(1))


def documented_keys() -> set[str]:
    """Key paths in the first column of the tables under "## Keys", e.g. nodes.NAME.tap.mtu."""
    section = CONFIGURATION.read_text().split("\n## Keys\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+(?:\.[A-Za-z0-9_]+)*)` \|", section, re.MULTILINE))


def write_tree(tmp_path: Path, doc: dict[str, Any]) -> Path:
    key = tmp_path / "psk.key"
    key.write_text("1 a-shared-secret-of-16-chars\n")  # a key the node accepts
    key.chmod(0o600)
    path = tmp_path / "tree.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_complete_example_is_a_valid_tree(tmp_path: Path) -> None:
    tree = load_tree(write_tree(tmp_path, complete_example()))
    assert tree.nodes


def section_of(doc: dict[str, Any], path: str) -> dict[str, Any]:
    """The mapping at a documented section path; NAME is the first node of the example."""
    node = doc
    for part in path.split(".") if path else []:
        node = node[next(iter(node)) if part == "NAME" else part]
    return node


def accepted_keys(tmp_path: Path, path: str) -> set[str]:
    """The keys the loader accepts at `path`, from its unknown-key error."""
    doc = complete_example()
    section_of(doc, path)[BOGUS] = 1
    with pytest.raises(ConfigError) as error:
        load_tree(write_tree(tmp_path, doc))
    message = str(error.value)
    assert f"{BOGUS}: unknown key (expected " in message, message
    return set(message.rsplit("(expected ", 1)[1].rstrip(")").split(", "))


SECTIONS = ["", "overlay", "nodes.NAME", "nodes.NAME.tap", "nodes.NAME.igmp", "nodes.NAME.mld"]


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s or "top")
def test_documented_keys_are_exactly_the_accepted_keys(tmp_path: Path, section: str) -> None:
    # The querier table is written once, for igmp; mld takes the same keys.
    table = section.replace(".mld", ".igmp")
    prefix = f"{table}." if table else ""
    documented = {
        key[len(prefix) :]
        for key in documented_keys()
        if key.startswith(prefix) and "." not in key[len(prefix) :]
    }
    assert documented == accepted_keys(tmp_path, section)


def test_complete_example_uses_every_documented_key() -> None:
    doc = complete_example()
    for key in documented_keys():
        parent, _, leaf = key.rpartition(".")
        assert leaf in section_of(doc, parent), f"the complete example lacks {key}"
        if ".igmp" in parent:
            assert leaf in section_of(doc, parent.replace(".igmp", ".mld")), (
                f"the example lacks {key} for mld"
            )


def test_duration_table() -> None:
    text = CONFIGURATION.read_text()
    section = text.split("## Durations", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` +\| +([0-9.]+) \|", section, re.MULTILINE)
    assert len(rows) >= 4
    for written, seconds in rows:
        assert parse_duration(written) == float(seconds), written
