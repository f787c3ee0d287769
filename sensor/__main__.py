"""The sensor on its own: `python -m sensor --iface IF`.

Compiles and attaches the kernel programs, streams every event as a JSON line,
reclaims expired verdicts, and detaches on SIGTERM or SIGINT (the pinned
verdict maps stay for the next start). Killed with SIGKILL it leaves the
programs attached, so the kernel keeps enforcing its live verdicts until their
expiry; the next start replaces its own programs and finds the same maps.
`botwall run` adds the engine and the admin API on top of the same pieces.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from sensor.errors import BotwallError
from sensor.events import event_to_dict
from sensor.loader import DEFAULT_PIN_DIR, Sensor, SensorSettings
from sensor.sources import BccSensor
from sensor.verdicts import VerdictMaps

EXPIRE_EVERY_S = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sensor", description=__doc__.splitlines()[0])
    p.add_argument("--iface", action="append", required=True, help="interface to attach to")
    p.add_argument("--netns", help="network namespace the interfaces are in")
    p.add_argument("--mode", choices=("auto", "native", "generic"), default="auto")
    p.add_argument("--tls-port", type=int, action="append", default=[], help="default 443")
    p.add_argument("--http-port", type=int, action="append", default=[])
    p.add_argument("--pin-dir", default=DEFAULT_PIN_DIR)
    p.add_argument("--idle-timeout", type=float, default=30.0, help="seconds")
    p.add_argument("--quiet", action="store_true", help="do not print events")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = False

    def request_stop(_signum: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        settings = SensorSettings(
            tls_ports=tuple(args.tls_port) or ((443,) if not args.http_port else ()),
            http_ports=tuple(args.http_port),
            pin_dir=args.pin_dir,
        )
        sensor = Sensor(settings)
        for ifname in args.iface:
            attached = sensor.attach(ifname, mode=args.mode, netns=args.netns)
            print(json.dumps({"type": "attached", "iface": ifname, "mode": attached.xdp_mode}))
    except BotwallError as exc:
        print(f"botwall sensor: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()

    source = BccSensor(sensor, idle_timeout_s=args.idle_timeout)
    verdicts = VerdictMaps(sensor.table)
    next_expiry = time.monotonic() + EXPIRE_EVERY_S
    try:
        while not stop:
            for event in source.poll(200):
                if not args.quiet:
                    print(json.dumps(event_to_dict(event)), flush=True)
            if time.monotonic() >= next_expiry:
                verdicts.expire()
                next_expiry = time.monotonic() + EXPIRE_EVERY_S
    finally:
        sensor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
