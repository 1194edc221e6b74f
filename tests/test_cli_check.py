"""`mcmw check` and `mcmw map` as an operator runs them: exit codes and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "configs").glob("*.yaml"))


def mcmw(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcmw", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_check_accepts_the_examples(path: Path) -> None:
    result = mcmw("check", "-c", path)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    assert result.stderr == ""


BROKEN = {
    "bad-duration": (
        "nodes:\n"
        "  a:\n"
        "    listen: 127.0.0.1:7000\n"
        "    tap: {name: t0, address: 169.254.1.1/16}\n"
        "    igmp:\n"
        "      query_interval: 12x\n"
        "links: []\n",
        ":6: nodes.a.igmp.query_interval: '12x' is not a duration",
    ),
    "cycle": (
        "nodes:\n"
        "  a: {listen: 127.0.0.1:7000, tap: {name: t0, address: 169.254.1.1/16}}\n"
        "  b: {listen: 127.0.0.1:7010, tap: {name: t1, address: 169.254.1.2/16}}\n"
        "  c: {listen: 127.0.0.1:7020, tap: {name: t2, address: 169.254.1.3/16}}\n"
        "links:\n"
        "  - [a, b]\n"
        "  - [b, c]\n"
        "  - [c, a]\n",
        ":8: links[2]: [c, a] closes the cycle",
    ),
    "disconnected": (
        "nodes:\n"
        "  a: {listen: 127.0.0.1:7000, tap: {name: t0, address: 169.254.1.1/16}}\n"
        "  b: {listen: 127.0.0.1:7010, tap: {name: t1, address: 169.254.1.2/16}}\n"
        "links: []\n",
        ":3: nodes.b: not connected to the tree",
    ),
    "unknown-node": (
        "nodes:\n"
        "  a: {listen: 127.0.0.1:7000, tap: {name: t0, address: 169.254.1.1/16}}\n"
        "links: [[a, zed]]\n",
        ":3: links[0]: unknown node 'zed'",
    ),
    "same-tap-address": (
        "nodes:\n"
        "  a: {listen: 127.0.0.1:7000, tap: {name: t0, address: 169.254.1.1/16}}\n"
        "  b: {listen: 127.0.0.1:7010, tap: {name: t1, address: 169.254.1.1/16}}\n"
        "links: [[a, b]]\n",
        ":3: nodes.b.tap.address: 169.254.1.1 is also the TAP address of a",
    ),
    "unknown-key": (
        "nodes:\n"
        "  a:\n"
        "    listen: 127.0.0.1:7000\n"
        "    tap: {name: t0, address: 169.254.1.1/16}\n"
        "    colour: blue\n"
        "links: []\n",
        ":5: nodes.a.colour: unknown key",
    ),
    "yaml-syntax": ("nodes: {a: [\n", ":2:1: not valid YAML"),
    "empty": ("", ": the file is empty"),
    "not-a-mapping": ("- a\n- b\n", ":1: the top level must be a mapping"),
    "binary": ("\x00\x01\x02", ": not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_rejects(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    line = assert_one_line_error(mcmw("check", "-c", path))
    assert line.startswith(f"mcmw check: {path}{expected}"), line
    assert mcmw("check", "-c", path).stdout == ""


def test_check_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    line = assert_one_line_error(mcmw("check", "-c", path))
    assert line == f"mcmw check: {path}: no such file"


def test_check_directory(tmp_path: Path) -> None:
    line = assert_one_line_error(mcmw("check", "-c", tmp_path))
    assert line.startswith(f"mcmw check: {tmp_path}: ")


def test_map_the_spec_example() -> None:
    result = mcmw("map", "239.1.1.1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == ["239.1.1.1", "->", "65793"]


def test_map_with_a_tree() -> None:
    result = mcmw("map", "ff0e::1", "-c", REPO / "configs" / "star-seven.yaml")
    assert result.returncode == 0, result.stderr
    assert "(hash, 32 bits)" in result.stdout


def test_map_with_a_broken_tree(tmp_path: Path) -> None:
    path = tmp_path / "tree.yaml"
    path.write_text(
        "overlay: {mapping: nope}\n"
        "nodes: {a: {listen: 127.0.0.1:7000, tap: {name: t0, address: 169.254.1.1/16}}}\n"
        "links: []\n"
    )
    line = assert_one_line_error(mcmw("map", "239.1.1.1", "-c", path))
    assert line.startswith(f"mcmw map: {path}:1: overlay.mapping: 'nope' is not one of")


def test_map_rejects_a_unicast_address() -> None:
    line = assert_one_line_error(mcmw("map", "10.0.0.1"))
    assert "'10.0.0.1' is not a multicast group" in line


BROKEN_MORE = {
    "same-listen-address": (
        "nodes:\n"
        "  a: {listen: 127.0.0.1:7000, tap: {name: t0, address: 169.254.1.1/16}}\n"
        "  b: {listen: 127.0.0.1:7000, tap: {name: t1, address: 169.254.1.2/16}}\n"
        "links: [[a, b]]\n",
        ":3: nodes.b.listen: 127.0.0.1:7000 is also the listen address of a",
    ),
    "bad-address": (
        "nodes:\n"
        "  a: {listen: 127.0.0.1:7000, tap: {name: t0, address: 169.254.1.300/16}}\n"
        "links: []\n",
        ":2: nodes.a.tap.address: '169.254.1.300/16' is not an IPv4 address/prefix",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MORE))
def test_check_rejects_more(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN_MORE[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    line = assert_one_line_error(mcmw("check", "-c", path))
    assert line.startswith(f"mcmw check: {path}{expected}"), line


def test_run_with_a_broken_tree_or_an_unknown_node_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Before it touches anything (no TAP, no socket): `run` reads the tree as `check` does."""
    text, expected = BROKEN["cycle"]
    path = tmp_path / "cycle.yaml"
    path.write_text(text)
    line = assert_one_line_error(mcmw("run", "-c", path, "--node", "a", "--socket", tmp_path / "a.sock"))
    assert line.startswith(f"mcmw run: {path}{expected}"), line
    good = REPO / "configs" / EXAMPLES[0].name
    line = assert_one_line_error(mcmw("run", "-c", good, "--node", "nobody", "--socket", tmp_path / "x.sock"))
    assert "no node named 'nobody'" in line


def test_status_without_node_or_socket_asks_the_one_node_running_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mcmw import cli

    monkeypatch.setattr(cli, "SOCKET_DIR", str(tmp_path))
    assert cli.main(["status"]) == 1
    assert f"no node at {tmp_path}" in capsys.readouterr().err
    (tmp_path / "a.sock").touch()  # not a live socket: the error names the one it tried
    assert cli.main(["status", "--json"]) == 1
    assert str(tmp_path / "a.sock") in capsys.readouterr().err
    (tmp_path / "b.sock").touch()
    assert cli.main(["status"]) == 2
    assert "several nodes run here (a, b): give --node NAME or --socket PATH" in capsys.readouterr().err
