"""`python -m lab.api` runs the demo shop behind nginx in a fresh lab topology until Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from lab.api.server import ShopServer
from lab.netns import Topology, check_root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.api", description=__doc__)
    parser.add_argument("--prefix", default="bw", help="namespace name prefix")
    parser.add_argument("--products", type=int, default=500)
    parser.add_argument("--events-url", help="the botwall agent, e.g. http://127.0.0.1:8765")
    parser.add_argument("--events-token-file", type=Path, help="file holding the agent's token")
    args = parser.parse_args(argv)
    if (args.events_url is None) != (args.events_token_file is None):
        parser.error("--events-url and --events-token-file go together")
    check_root()
    # Started in the background by a non-interactive shell, we inherit SIGINT
    # ignored, and Python then installs no KeyboardInterrupt for it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with (
        Topology(args.prefix) as topo,
        ShopServer(
            topo,
            products=args.products,
            events_url=args.events_url,
            events_token_file=args.events_token_file,
        ) as shop,
    ):
        assert shop.cert is not None
        resolve = f"{shop.hostname}:{shop.tls_port}:{topo.server_v4}"
        print(
            json.dumps(
                {
                    "server_ns": topo.server_ns,
                    "client_ns": topo.client_ns,
                    "url": f"https://{shop.hostname}:{shop.tls_port}/",
                    "ca": str(shop.cert.ca_path),
                    "access_log": str(shop.access_log_path),
                    "try": f"ip netns exec {topo.client_ns} curl --cacert {shop.cert.ca_path} "
                    f"--resolve {resolve} https://{shop.hostname}/products/1",
                }
            ),
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt, SystemExit):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
