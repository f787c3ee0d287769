"""The `botwall` command line: one function per command, each importing what it needs.

Commands import their dependencies inside the function, so `botwall --help`
and every command stay fast and a command's heavy imports (scapy, BCC,
scikit-learn) cost nothing to the others. Errors a user can cause (a missing
file, a bad option) print one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from controlplane.client import AdminClient
    from sensor.events import Event

EXIT_USAGE = 2
EXIT_FAILURE = 1  # the command ran and failed (the lab broke, say)
EXIT_TARGETS_MISSED = 3  # `botwall lab` ran to the end and some target was missed

app = typer.Typer(
    name="botwall",
    help="API bot defence at the kernel: see every client's TCP, TLS and HTTP stack.",
    no_args_is_help=True,
    add_completion=False,
    # Locals in a traceback can hold tokens and addresses: never print them.
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main() -> None:
    """botwall: API bot defence at the kernel."""
    # A callback makes typer keep command names even while there is one command.


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print a one-line error on stderr; raise the returned Exit."""
    typer.echo(f"botwall: {message}", err=True)
    return typer.Exit(code)


Ports = Annotated[list[int] | None, typer.Option(min=1, max=65535, show_default=False)]


@app.command()
def fingerprint(
    pcap: Annotated[Path, typer.Argument(help="pcap or pcapng capture", show_default=False)],
    tls_port: Ports = None,
    http_port: Ports = None,
) -> None:
    """Print one JSON line per TCP SYN and per complete TLS ClientHello in a capture.

    SYN lines: flow, tcp_signature, os_guess, ttl, window, mss, wscale, options.
    ClientHello lines: flow, sni, ja4, ja4_r, ja3, ja3_string. Lines follow
    capture order. Without --tls-port/--http-port every port is watched.
    """
    from sensor.replay import ReplayError, ReplaySource

    try:
        source = ReplaySource(pcap, tls_ports=tls_port, http_ports=http_port)
        for row in fingerprint_rows(source.events()):
            sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()
    except ReplayError as exc:
        raise fail(str(exc)) from None
    except BrokenPipeError:
        # The reader (head, a pager) went away: stop quietly, as cat does.
        # stdout still holds unflushed bytes; point it at /dev/null so the
        # interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


def fingerprint_rows(events: Iterable[Event]) -> Iterator[dict[str, Any]]:
    """The `fingerprint` command's rows, from any iterable of sensor events."""
    from sensor.events import ClientHelloSegment, FlowEnd, SynEvent
    from sensor.fingerprint.ja3 import ja3, ja3_string
    from sensor.fingerprint.ja4 import ja4, ja4_r
    from sensor.fingerprint.reassembly import HelloAssembler
    from sensor.fingerprint.tcp import os_guess, syn_signature
    from sensor.fingerprint.tls import ParseError, parse_client_hello

    assembler = HelloAssembler()
    for event in events:
        if isinstance(event, SynEvent):
            sig = syn_signature(event)
            guess = os_guess(sig)
            yield {
                "flow": str(event.flow),
                "tcp_signature": str(sig),
                "os_guess": {
                    "family": guess.family,
                    "confidence": guess.confidence,
                    "reason": guess.reason,
                },
                "ttl": event.ttl,
                "window": event.window,
                "mss": event.mss,
                "wscale": event.wscale,
                "options": sig.options,
            }
        elif isinstance(event, ClientHelloSegment):
            done = assembler.feed(event)
            if done is None:
                continue
            try:
                hello = parse_client_hello(done.handshake)
            except ParseError:
                continue  # reassembled but malformed: nothing to fingerprint
            yield {
                "flow": str(done.flow),
                "sni": hello.sni,
                "ja4": ja4(hello),
                "ja4_r": ja4_r(hello),
                "ja3": ja3(hello),
                "ja3_string": ja3_string(hello),
            }
        elif isinstance(event, FlowEnd):
            assembler.forget(event.flow)


# ---- the admin API: every command below talks to a running agent ----

ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api",
        help="admin API URL [default: $BOTWALL_API, else http://127.0.0.1:9440]",
        show_default=False,
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="admin token [default: $BOTWALL_TOKEN, else {state-dir}/admin.token]",
        show_default=False,
    ),
]
StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="the agent's state directory [default: $BOTWALL_STATE_DIR, else /var/lib/botwall]",
        show_default=False,
    ),
]
# The environment is read by controlplane.client.discover, not by typer, so an
# error can say where a refused token came from (--token, BOTWALL_TOKEN, a file).
AsJson = Annotated[bool, typer.Option("--json", help="print the agent's JSON reply as is")]


@contextmanager
def admin(api: str | None, token: str | None, state_dir: Path | None) -> Iterator[AdminClient]:
    """An admin API client; an ApiError inside becomes one line on stderr and exit 2."""
    from controlplane.client import AdminClient, ApiError, discover

    try:
        with AdminClient(discover(api, token, state_dir)) as client:
            yield client
    except ApiError as exc:
        raise fail(str(exc)) from None


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def console() -> Console:
    from rich.console import Console

    # Wide values (JA4s, TCP signatures) wrap rather than being cut with "…".
    return Console(highlight=False, soft_wrap=False)


def _items(data: Any, *keys: str) -> list[Any]:
    """The list in a reply: the reply itself, or the first of keys in a dict."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in keys:
            if isinstance(data.get(key), list):
                return list(data[key])
    return []


def _pick(row: Any, *names: str) -> Any:
    """The first of names present in a row: the API may name a field either way."""
    if isinstance(row, dict):
        for name in names:
            if row.get(name) is not None:
                return row[name]
    return None


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list | tuple | set):
        return ", ".join(_text(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _reason(reason: Any) -> str:
    """A reason as words: {"text": ...} or {"code": ...} or a bare string."""
    if isinstance(reason, dict):
        return str(_pick(reason, "text", "code") or json.dumps(reason))
    return str(reason)


def _top_reason(row: Any) -> str:
    reasons = _pick(row, "reasons", "top_reasons")
    if isinstance(reasons, list) and reasons:
        return _reason(reasons[0])
    return _text(_pick(row, "reason", "top_reason"))


def _flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, scalar) pairs of a nested dict, for key/value tables."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), data


def _key_values(title: str | None, data: Any) -> Table:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in _flatten(data):
        table.add_row(key, _text(value))
    return table


@app.command()
def status(
    api: ApiUrl = None, token: Token = None, state_dir: StateDir = None, as_json: AsJson = False
) -> None:
    """The agent's counters: events, clients scored, decisions, latencies."""
    with admin(api, token, state_dir) as client:
        stats = client.stats()
        url = client.endpoint.url
    if as_json:
        print_json(stats)
        return
    # The URL above the table, not as its title: a title wraps to the table's width.
    out = console()
    out.print(f"botwall agent at {url}")
    out.print(_key_values(None, stats))


@app.command()
def clients(
    limit: Annotated[int, typer.Option(min=1, help="how many clients")] = 20,
    api: ApiUrl = None,
    token: Token = None,
    state_dir: StateDir = None,
    as_json: AsJson = False,
) -> None:
    """The riskiest clients the agent knows, riskiest first."""
    from rich.table import Table

    with admin(api, token, state_dir) as client:
        data = client.clients(limit=limit)
    if as_json:
        print_json(data)
        return
    table = Table(title="clients by risk")
    for name in ("address", "risk", "JA4", "TCP signature", "requests", "top reason"):
        table.add_column(name, overflow="fold")
    for row in _items(data, "clients", "items"):
        table.add_row(
            _text(_pick(row, "address", "addr", "client")),
            _text(_pick(row, "risk", "score")),
            _text(_pick(row, "ja4", "ja4s")),
            _text(_pick(row, "tcp_signature", "tcp")),
            _text(_pick(row, "requests")),
            _top_reason(row),
        )
    console().print(table)


@app.command()
def show(
    addr: Annotated[str, typer.Argument(help="client address", show_default=False)],
    api: ApiUrl = None,
    token: Token = None,
    state_dir: StateDir = None,
    as_json: AsJson = False,
) -> None:
    """One client: its fingerprints, features, risk with every reason, and decisions."""
    import ipaddress

    try:
        addr = str(ipaddress.ip_address(addr))
    except ValueError:
        raise fail(f"not an IP address: {addr!r}") from None
    with admin(api, token, state_dir) as client:
        data = client.client(addr)
    if as_json:
        print_json(data)
        return
    out = console()
    if not isinstance(data, dict):
        out.print(_text(data))
        return
    # The risk may be nested ({"risk": {"score", "reasons"}}) or flat.
    nested = data.get("risk")
    risk: dict[str, Any] = nested if isinstance(nested, dict) else {}
    reasons = data.get("reasons") or risk.get("reasons") or []
    # Reasons and decisions read best as lists; everything else as key/value.
    rest = {k: v for k, v in data.items() if k not in ("reasons", "decisions", "risk")}
    rest.update({f"risk.{k}": v for k, v in risk.items() if k != "reasons"})
    out.print(_key_values(f"client {addr}", rest))
    if reasons:
        out.print("reasons:")
        for reason in reasons:
            points = _pick(reason, "points")
            lead = f"  {points:5.1f}  " if isinstance(points, int | float) else "  "
            out.print(f"{lead}{_reason(reason)}")
    decisions = data.get("decisions") or []
    if decisions:
        out.print("decisions:")
        for d in decisions:
            out.print(f"  {_decision_line(d)}")


def _decision_line(d: Any) -> str:
    parts = [
        _text(_pick(d, "action")),
        _text(_pick(d, "target")),
        f"ttl {_text(_pick(d, 'ttl_s'))} s",
    ]
    if _pick(d, "id") is not None:
        parts.insert(0, f"[{d['id']}]")
    reason = _pick(d, "reason")
    if reason:
        parts.append(f"- {reason}")
    return " ".join(parts)


# A JA4 (a_b_c), optionally scoped to a source ("ja4@10.0.0.0/8"), as policy writes it.
_JA4 = re.compile(r"^[tqd][0-9a-z]{2}[di][0-9]{4}[0-9a-z]{2}_[0-9a-f]{12}_[0-9a-f]{12}(@\S+)?$")


def target_kind(target: str) -> str:
    """The kind of a target: "addr", "cidr" or "ja4", or a ValueError naming the target."""
    import ipaddress

    try:
        ipaddress.ip_address(target)
        return "addr"
    except ValueError:
        pass
    if "/" in target:
        try:
            ipaddress.ip_network(target, strict=False)
            return "cidr"
        except ValueError:
            pass
    if _JA4.match(target):
        return "ja4"
    raise ValueError(f"not an address, CIDR or JA4: {target!r}")


def _manual(
    action: str,
    target: str,
    ttl: float,
    reason: str | None,
    kinds: tuple[str, ...],
    conn: tuple[str | None, str | None, Path | None],
    as_json: bool,
) -> None:
    """POST /v1/decisions for block and allow, after checking the target here:
    a typo should not need the agent to be told it is one."""
    try:
        kind = target_kind(target)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if kind not in kinds:
        raise fail(f"{action} takes an address or a CIDR, not a {kind.upper()}: {target!r}")
    with admin(*conn) as client:
        made = client.add_decision(action, target, ttl, reason or f"manual: botwall {action}")
    if as_json:
        print_json(made)
        return
    ident = _pick(made, "id")
    suffix = f" (decision {ident})" if ident is not None else ""
    typer.echo(f"{action} {target} for {ttl:g} s{suffix}")


Ttl = Annotated[float, typer.Option("--ttl", min=1, help="seconds until the verdict expires")]
ReasonOpt = Annotated[
    str | None, typer.Option("--reason", help="recorded with the decision", show_default=False)
]


@app.command()
def block(
    target: Annotated[str, typer.Argument(help="address, CIDR or JA4", show_default=False)],
    ttl: Ttl = 3600.0,
    reason: ReasonOpt = None,
    api: ApiUrl = None,
    token: Token = None,
    state_dir: StateDir = None,
    as_json: AsJson = False,
) -> None:
    """Block an address, a CIDR or a JA4 in the kernel, for --ttl seconds."""
    _manual("block", target, ttl, reason, ("addr", "cidr", "ja4"), (api, token, state_dir),
            as_json)  # fmt: skip


@app.command()
def allow(
    target: Annotated[str, typer.Argument(help="address, CIDR or JA4", show_default=False)],
    ttl: Ttl = 86400.0,
    reason: ReasonOpt = None,
    api: ApiUrl = None,
    token: Token = None,
    state_dir: StateDir = None,
    as_json: AsJson = False,
) -> None:
    """Allow an address, a CIDR or a JA4 whatever its risk, for --ttl seconds (allow
    wins). A JA4 allow is written for each address as it presents that JA4."""
    _manual("allow", target, ttl, reason, ("addr", "cidr", "ja4"), (api, token, state_dir),
            as_json)  # fmt: skip


# What `unblock` lifts: everything that holds a client back. An allow is left alone.
RESTRICTING = frozenset({"block", "throttle", "tarpit", "block_flow"})


def same_target(a: str, b: str) -> bool:
    """Whether two targets name the same thing: 10.0.0.1 is ::ffff:10.0.0.1, a
    CIDR's host bits do not matter, a JA4 is compared as text."""
    import ipaddress

    def norm(t: str) -> str:
        try:
            ip = ipaddress.ip_address(t)
            mapped = getattr(ip, "ipv4_mapped", None)
            return str(mapped or ip)
        except ValueError:
            pass
        try:
            return str(ipaddress.ip_network(t, strict=False))
        except ValueError:
            return t

    return norm(a) == norm(b)


@app.command()
def unblock(
    target: Annotated[str, typer.Argument(help="address, CIDR or JA4", show_default=False)],
    api: ApiUrl = None,
    token: Token = None,
    state_dir: StateDir = None,
) -> None:
    """Lift every live block, throttle and tarpit on exactly this target."""
    try:
        target_kind(target)
    except ValueError as exc:
        raise fail(str(exc)) from None
    with admin(api, token, state_dir) as client:
        found = [
            d
            for d in _items(client.decisions(), "decisions", "items")
            if isinstance(d, dict)
            and d.get("id") is not None
            and str(d.get("action")) in RESTRICTING
            and same_target(str(d.get("target", "")), target)
            # A reply may list expired decisions for the record: those need no lifting.
            and d.get("active", True) is not False
            and not d.get("expired", False)
        ]
        for d in found:
            client.delete_decision(str(d["id"]))
    if not found:
        typer.echo(f"no live block, throttle or tarpit on {target}")
        return
    for d in found:
        typer.echo(f"removed {_decision_line(d)}")


policy_app = typer.Typer(help="The running policy: show it, or replace it.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


@policy_app.command("show")
def policy_show(api: ApiUrl = None, token: Token = None, state_dir: StateDir = None) -> None:
    """Print the running policy (TOML)."""
    with admin(api, token, state_dir) as client:
        text = client.policy()
    typer.echo(text, nl=not text.endswith("\n"))


@policy_app.command("set")
def policy_set(
    file: Annotated[Path, typer.Argument(help="policy TOML file", show_default=False)],
    api: ApiUrl = None,
    token: Token = None,
    state_dir: StateDir = None,
) -> None:
    """Replace the running policy with FILE; a bad policy is refused and the old stays."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot read {str(file)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise fail(f"{str(file)!r} is not UTF-8 text") from None
    with admin(api, token, state_dir) as client:
        client.set_policy(text)
    typer.echo(f"policy replaced from {file}")


models_app = typer.Typer(help="Model versions: list, retrain, promote.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(
    api: ApiUrl = None, token: Token = None, state_dir: StateDir = None, as_json: AsJson = False
) -> None:
    """Every model version the agent holds, and which ones are in use."""
    from rich.table import Table

    with admin(api, token, state_dir) as client:
        data = client.models()
    if as_json:
        print_json(data)
        return
    table = Table(title="models")
    for name in ("version", "model", "state", "created", "metrics"):
        table.add_column(name, overflow="fold")
    for row in _items(data, "models", "versions", "items"):
        state = _pick(row, "state", "status")
        if state is None and isinstance(row, dict):
            state = "active" if row.get("active") or row.get("promoted") else None
        table.add_row(
            _text(_pick(row, "version", "id")),
            _text(_pick(row, "model", "name", "kind")),
            _text(state),
            _text(_pick(row, "created", "created_at", "trained_at")),
            _text(_pick(row, "metrics")),
        )
    console().print(table)


@models_app.command("retrain")
def models_retrain(
    api: ApiUrl = None, token: Token = None, state_dir: StateDir = None, as_json: AsJson = False
) -> None:
    """Retrain the supervised model on the feedback and verdicts so far (in shadow)."""
    with admin(api, token, state_dir) as client:
        data = client.retrain()
    if as_json:
        print_json(data)
        return
    version = _pick(data, "version", "id")
    typer.echo(f"retrained: version {version}" if version is not None else "retrained")
    if isinstance(data, dict):
        console().print(_key_values("retraining", data))


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="model version", show_default=False)],
    api: ApiUrl = None,
    token: Token = None,
    state_dir: StateDir = None,
) -> None:
    """Put a model version in use."""
    with admin(api, token, state_dir) as client:
        client.promote(version)
    typer.echo(f"promoted {version}")


# ---- local commands: no agent needed ----


@app.command()
def replay(
    pcap: Annotated[Path, typer.Argument(help="pcap or pcapng capture", show_default=False)],
    tls_port: Ports = None,
    http_port: Ports = None,
    policy: Annotated[
        Path | None,
        typer.Option(help="policy TOML [default: the shipped policy]", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
) -> None:
    """Run the detection engine over a capture, unprivileged, and say what it would do.

    Per client: address, JA4s, TCP signature and OS guess, connections and
    requests, risk and its top reasons, and the decisions the policy would
    make. Nothing is enforced. Without --tls-port/--http-port every port is
    watched.
    """
    from sensor.errors import PolicyError
    from sensor.replay import ReplayError

    try:
        report = replay_report(pcap, tls_ports=tls_port, http_ports=http_port, policy=policy)
    except (ReplayError, PolicyError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        print_json(report)
        return
    _print_report(report)


def _decision_cell(d: dict[str, Any]) -> str:
    return f"{d['action']} {d['ttl_s']:g}s" + (" (shadow)" if d["shadow"] else "")


def _print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    out = console()
    table = Table(title=f"clients in {report['capture']}")
    for name in ("address", "JA4", "TCP signature / OS", "conns", "requests", "risk",
                 "top reasons", "decisions"):  # fmt: skip
        table.add_column(name, overflow="fold")
    for c in report["clients"]:
        tcp = [f"{sig} ({os_})" for sig, os_ in zip(c["tcp_signature"], c["os_guess"], strict=True)]
        table.add_row(
            c["address"],
            "\n".join(c["ja4"]) or "-",
            "\n".join(tcp) or "-",
            str(c["connections"]),
            str(c["requests"]),
            "-" if c["risk"] is None else f"{c['risk']:.1f}",
            "\n".join(r["text"] for r in c["reasons"]) or "-",
            "\n".join(_decision_cell(d) for d in c["decisions"]) or "-",
        )
    out.print(table)
    others = [d for d in report["decisions"] if not d["client"]]
    if others:
        out.print("decisions on clusters:")
        for d in others:
            shadow = " (shadow)" if d["shadow"] else ""
            out.print(f"  {d['action']} {d['target']} {d['ttl_s']:g}s{shadow}: {d['reason']}")
    out.print(
        f"{report['packets']} packets, {len(report['clients'])} clients, "
        f"{len(report['decisions'])} decisions"
    )


@app.command()
def detach(
    iface: Annotated[
        list[str] | None,
        typer.Option("--iface", help="interface [default: every interface]", show_default=False),
    ] = None,
    netns: Annotated[str | None, typer.Option(help="network namespace", show_default=False)] = None,
    pin_dir: Annotated[str, typer.Option(help="where the verdict maps are pinned")] = (
        "/sys/fs/bpf/botwall"
    ),
    keep_verdicts: Annotated[
        bool, typer.Option("--keep-verdicts", help="leave the pinned verdict maps in place")
    ] = False,
    api: ApiUrl = None,
    token: Token = None,
    state_dir: StateDir = None,
) -> None:
    """Remove botwall's XDP and tc programs from interfaces, and its verdicts.

    A running agent is asked through its admin API: it detaches, removes its
    pinned verdicts (unless --keep-verdicts) and stops. With no agent
    answering (it died and its programs stayed attached) the programs are
    removed here, as root: without --iface from every interface in the
    namespace, where the clsact qdisc is left, since another tool may use it.
    """
    from controlplane.client import AdminClient, ApiError, discover

    with AdminClient(discover(api, token, state_dir)) as client:
        if client.running():
            try:
                client.detach(keep_verdicts)
            except ApiError as exc:
                raise fail(str(exc)) from None
            _wait_stopped(client)
            typer.echo(f"the agent at {client.endpoint.url} detached and stopped")
            if not keep_verdicts:
                typer.echo("it removed its pinned verdict maps")
            return
    if os.geteuid() != 0:
        raise fail("botwall detach needs root (CAP_NET_ADMIN, CAP_BPF): run it with sudo")
    from sensor.errors import SensorError
    from sensor.loader import detach_interface, remove_pins

    try:
        names = iface or _interfaces(netns)
        for name in names:
            # An interface named on purpose gets the full clean-up, clsact included.
            if detach_interface(name, netns=netns, remove_clsact=bool(iface)):
                typer.echo(f"detached botwall from {name}")
            elif iface:
                typer.echo(f"{name}: botwall was not attached")
        if not keep_verdicts:
            existed = os.path.isdir(pin_dir)
            remove_pins(pin_dir)
            if existed:
                typer.echo(f"removed the pinned verdict maps in {pin_dir}")
    except SensorError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"{exc.filename or pin_dir}: {exc.strerror}") from None


AGENT_STOP_TIMEOUT_S = 30.0


def _wait_stopped(client: Any) -> None:
    """Until the agent no longer answers, or fail after AGENT_STOP_TIMEOUT_S."""
    deadline = time.monotonic() + AGENT_STOP_TIMEOUT_S
    while client.running():
        if time.monotonic() > deadline:
            raise fail(f"the agent at {client.endpoint.url} still answers: is it stuck?")
        time.sleep(0.2)


def _interfaces(netns: str | None) -> list[str]:
    """Every interface's name in a network namespace (the host's if None)."""
    from pyroute2 import IPRoute, NetNS

    from sensor.errors import AttachError

    try:
        ipr = NetNS(netns) if netns else IPRoute()
    except Exception as exc:  # pyroute2 raises OSError or its own errors
        raise AttachError(f"cannot open network namespace {netns!r}: {exc}") from exc
    try:
        return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]
    finally:
        ipr.close()


def replay_report(
    pcap: Path,
    tls_ports: Iterable[int] | None = None,
    http_ports: Iterable[int] | None = None,
    policy: Path | None = None,
) -> dict[str, Any]:
    """The `replay` command's report: the engine run over a capture, per client.

    The engine is built as the agent builds it before any learning (consistency
    and campaign models, the policy, an Enforcer with no kernel maps), so what
    it decides here is what a fresh agent would decide on the same traffic."""
    from collections.abc import Sequence

    from controlplane.decisions import Decision, Risk, TargetKind
    from controlplane.enforce import Enforcer
    from controlplane.engine import Engine
    from controlplane.models.campaign import CampaignDetector
    from controlplane.models.consistency import ConsistencyModel
    from controlplane.observations import (
        Connection,
        ConnectionStage,
        Observation,
        Observer,
        Request,
    )
    from controlplane.policy import Policy, PolicyEngine
    from controlplane.scoring import ClientView, RiskScorer
    from sensor.replay import ReplaySource

    tallies: dict[str, dict[str, Any]] = {}

    def tally(addr: str) -> dict[str, Any]:
        # dicts as ordered sets: fingerprints in the order they were first seen
        return tallies.setdefault(addr, {"ja4": {}, "tcp": {}, "conns": 0, "requests": 0})

    class RecordingObserver(Observer):
        """The engine's own observer, also keeping what each client showed."""

        def feed(self, event: Event) -> list[Observation]:
            observations = super().feed(event)
            for obs in observations:
                t = tally(str(obs.client))
                fp = obs.fingerprint
                if fp.ja4:
                    t["ja4"][fp.ja4] = None
                if fp.tcp_signature:
                    t["tcp"][fp.tcp_signature] = fp.os_family or "unknown"
                if isinstance(obs, Connection) and obs.stage is ConnectionStage.SYN:
                    t["conns"] += 1
                elif isinstance(obs, Request):
                    t["requests"] += 1
            return observations

    latest: dict[str, Risk] = {}

    class RecordingScorer(RiskScorer):
        """Keeps every client's latest risk: the engine keeps only the risky ones."""

        def score_clients(
            self, views: Sequence[ClientView], cluster_risks: Any = None
        ) -> list[Risk]:
            risks = super().score_clients(views, cluster_risks)
            for risk in risks:
                latest[risk.key[1]] = risk
            return risks

    chosen = Policy.load(policy) if policy is not None else Policy.default()
    engine = Engine(
        scorer=RecordingScorer(
            consistency=ConsistencyModel().fit(), campaign=CampaignDetector().fit()
        ),
        policy=PolicyEngine(chosen),
        enforcer=Enforcer(None),
        observer=RecordingObserver(),
    )
    decisions: list[Decision] = []
    with ReplaySource(pcap, tls_ports=tls_ports, http_ports=http_ports) as source:
        for event in source.events():
            decisions.extend(engine.process(event))
        decisions.extend(engine.tick())
        packets = source.stats.packets

    def decision_row(d: Decision) -> dict[str, Any]:
        client = d.target if d.target_kind is TargetKind.ADDRESS else None
        if d.target_kind is TargetKind.FLOW:
            client = d.target.split("->")[0].rsplit(":", 1)[0].strip("[]")
        return {
            "action": str(d.action),
            "target_kind": str(d.target_kind),
            "target": d.target,
            "client": client,
            "ttl_s": d.ttl_s,
            "rule": d.rule,
            "reason": d.reason,
            "score": round(d.score, 1),
            "shadow": d.shadow,
            "ts": d.ts,
        }

    rows = [decision_row(d) for d in decisions]
    clients = []
    for addr, t in tallies.items():
        risk = latest.get(addr)
        clients.append(
            {
                "address": addr,
                "ja4": list(t["ja4"]),
                "tcp_signature": list(t["tcp"]),
                "os_guess": list(t["tcp"].values()),
                "connections": t["conns"],
                "requests": t["requests"],
                "risk": None if risk is None else round(risk.score, 1),
                "reasons": [
                    {"code": r.code, "text": r.text, "points": round(r.points, 1), "model": r.model}
                    for r in (risk.top(3) if risk else ())
                ],
                "decisions": [r for r in rows if r["client"] == addr],
            }
        )
    # Riskiest first; the unscored (a SYN and nothing more) last.
    clients.sort(key=lambda c: (-(c["risk"] if c["risk"] is not None else -1), c["address"]))
    return {"capture": str(pcap), "packets": packets, "clients": clients, "decisions": rows}


# ---- run: the agent (controlplane.agent parses its own options) ----


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def run(ctx: typer.Context) -> None:
    """Run the agent: sensor, engine, store and admin API (`botwall run --help`)."""
    from controlplane.agent import main as agent_main

    raise typer.Exit(agent_main(ctx.args))


@app.command()
def lab(
    duration: Annotated[
        float, typer.Option(min=20, help="seconds of traffic, learning included")
    ] = 120.0,
    scenario: Annotated[
        list[str] | None,
        typer.Option(help="a bad-bot scenario to run (repeatable; default: all of them)"),
    ] = None,
    report: Annotated[Path, typer.Option(help="directory for report.json and report.html")] = Path(
        "lab-report"
    ),
    learning: Annotated[
        float, typer.Option(min=0, help="seconds of honest traffic before the bots start")
    ] = 30.0,
    live: Annotated[bool, typer.Option(help="the live terminal view")] = True,
) -> None:
    """Run the lab: a real shop API under human, good-bot and bad-bot traffic,
    with the agent live; write REPORT/report.json and report.html (root only).
    Exit status: 0 every target met, 3 some target missed, 1 the lab failed."""
    if os.geteuid() != 0:
        raise fail("the lab needs root: it builds namespaces and loads eBPF programs", EXIT_FAILURE)
    if learning >= duration:
        raise fail(f"--learning ({learning:g} s) must be shorter than --duration ({duration:g} s)")
    from lab.run import BY_NAME, LabError, LabOptions, run_lab

    unknown = [name for name in scenario or [] if name not in BY_NAME]
    if unknown:
        raise fail(f"unknown scenario {unknown[0]!r}; choose from {', '.join(BY_NAME)}")
    options = LabOptions(
        duration_s=duration,
        learning_s=learning,
        scenarios=tuple(scenario or ()),
        report_dir=report,
        live=live,
    )
    try:
        result = run_lab(options)
    except LabError as exc:
        raise fail(f"lab: {exc}", EXIT_FAILURE) from None
    raise typer.Exit(0 if all(t.passed for t in result.targets) else EXIT_TARGETS_MISSED)


if __name__ == "__main__":
    app(prog_name="botwall")
