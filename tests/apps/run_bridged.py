"""`mcmw run` with the node's TAP enslaved to a bridge, for trees that cannot say so.

run_bridged.py TREE NODE SOCKET BRIDGE: exactly `mcmw run -c TREE --node NODE --socket
SOCKET`, except that the TAP is opened with `bridge=BRIDGE`. For tests, while the tree
file's `tap.bridge` key or the runtime's use of it is not there yet.
"""

from __future__ import annotations

import sys
from typing import Any

import mcmw.runtime
from tap.device import TapDevice


def main() -> int:
    tree, node, socket_path, bridge = sys.argv[1:5]

    def bridged_tap(*args: Any, **kwargs: Any) -> TapDevice:
        if len(args) > 4:
            args = (*args[:4], bridge, *args[5:])
        else:
            kwargs["bridge"] = bridge
        return TapDevice(*args, **kwargs)

    mcmw.runtime.TapDevice = bridged_tap  # type: ignore[assignment,misc]
    return mcmw.runtime.run_node(tree, node, socket_path, verbose=False)


if __name__ == "__main__":
    sys.exit(main())
