"""What the control plane knows about clients, built from sensor events.

The Observer joins the sensor's per-packet events into three observations:
a Connection (a new TCP connection with its SYN signature and, for TLS, its
JA4), a Request (one HTTP request with its route template and status), and a
FlowShape (a finished flow's sizes and timing, for TLS-only traffic). Above
this module nothing sees packets, flows or ring-buffer records.

Where L7 comes from (ARCHITECTURE.md): plaintext ports, and the upstream hop
of a TLS terminator on this host (nginx -> app on loopback). On that hop the
TCP client is the proxy; the real client is named by X-Forwarded-For and
X-Forwarded-Port, which join the request to the client's own TLS connection
and so to its JA4 and SYN signature.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from enum import StrEnum

from sensor.events import (
    ClientHelloSegment,
    Event,
    Flow,
    FlowEnd,
    HttpRequestHead,
    HttpResponseStatus,
    SynEvent,
)
from sensor.fingerprint.http import HttpParseError, fingerprint_hash, split_request_head
from sensor.fingerprint.ja4 import ja4
from sensor.fingerprint.reassembly import HelloAssembler
from sensor.fingerprint.tcp import syn_fingerprint
from sensor.fingerprint.tls import ParseError, hello_key, parse_client_hello

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NS_PER_S = 1_000_000_000


class EndpointClass(StrEnum):
    """What an endpoint is for; sensitive classes get stricter policy."""

    LOGIN = "login"
    OTP = "otp"  # one-time codes by SMS or mail: SMS pumping
    CART = "cart"
    CHECKOUT = "checkout"
    SEARCH = "search"
    ACCOUNT = "account"
    CATALOG = "catalog"
    INVENTORY = "inventory"
    OTHER = "other"


SENSITIVE_CLASSES = frozenset(
    {EndpointClass.LOGIN, EndpointClass.OTP, EndpointClass.CART, EndpointClass.CHECKOUT,
     EndpointClass.SEARCH}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ClientFingerprint:
    """The stack a connection really runs, as far as the sensor saw it."""

    ja4: str | None = None
    tcp_signature: str | None = None  # sensor.fingerprint.tcp compact form
    os_family: str | None = None  # the SYN's OS guess
    sni: str | None = None


class ConnectionStage(StrEnum):
    SYN = "syn"  # the SYN arrived: count a new connection here
    HELLO = "hello"  # the ClientHello completed: the JA4 is known now


@dataclass(frozen=True, slots=True)
class Connection:
    """A client's new TCP connection: once at its SYN, again once its JA4 is known."""

    ts: float  # seconds (the sensor's clock)
    client: IPAddress
    client_port: int
    server_port: int
    stage: ConnectionStage
    fingerprint: ClientFingerprint
    server: IPAddress | None = None  # the address the client connected to
    hello_key: int | None = None  # at HELLO: the kernel's key for its stack (bpf/common.h)


# Not frozen: the observer completes a request in place when its response
# arrives, and a frozen dataclass's __init__ costs a microsecond more (one
# object.__setattr__ per field), once per request.
@dataclass(slots=True)
class Request:
    """One HTTP request of one client, with the response status once seen."""

    ts: float  # seconds (the sensor's clock)
    client: IPAddress  # the real client: X-Forwarded-For behind a local proxy
    client_port: int
    method: str
    path: str  # without the query string
    route: str  # template: /products/{id}
    endpoint_class: EndpointClass
    status: int | None
    user_agent: str | None
    http_fingerprint: str | None  # sensor.fingerprint.http short hash
    fingerprint: ClientFingerprint
    latency_s: float | None = None  # server think time, when the status was seen
    header_names: tuple[str, ...] = ()
    has_cookie: bool = False
    has_referer: bool = False
    has_accept_language: bool = False


@dataclass(frozen=True, slots=True)
class FlowShape:
    """A finished connection's shape: what TLS-only traffic still shows."""

    ts: float
    client: IPAddress
    client_port: int
    server_port: int
    duration_s: float
    bytes_up: int
    bytes_down: int
    data_segments: int
    gap_mean_s: float | None
    gap_cv: float | None
    syn_retransmissions: int
    fingerprint: ClientFingerprint


Observation = Connection | Request | FlowShape


# ---- routes ----

_NUMERIC = re.compile(r"^\d+$")
_HEXID = re.compile(r"^[0-9a-fA-F]{8,}$|^[0-9a-fA-F-]{32,36}$")

_CLASS_BY_SEGMENT: dict[str, EndpointClass] = {
    "login": EndpointClass.LOGIN,
    "signin": EndpointClass.LOGIN,
    "auth": EndpointClass.LOGIN,
    "session": EndpointClass.LOGIN,
    "otp": EndpointClass.OTP,
    "sms": EndpointClass.OTP,
    "verify": EndpointClass.OTP,
    "cart": EndpointClass.CART,
    "basket": EndpointClass.CART,
    "checkout": EndpointClass.CHECKOUT,
    "order": EndpointClass.CHECKOUT,
    "orders": EndpointClass.CHECKOUT,
    "payment": EndpointClass.CHECKOUT,
    "search": EndpointClass.SEARCH,
    "account": EndpointClass.ACCOUNT,
    "profile": EndpointClass.ACCOUNT,
    "products": EndpointClass.CATALOG,
    "product": EndpointClass.CATALOG,
    "items": EndpointClass.CATALOG,
    "catalog": EndpointClass.CATALOG,
    "inventory": EndpointClass.INVENTORY,
    "stock": EndpointClass.INVENTORY,
}


@functools.lru_cache(maxsize=8192)
def route_template(path: str) -> str:
    """/products/123 -> /products/{id}: identifiers collapse so a catalog walk is
    one endpoint many times, not many endpoints once. Cached: a host's paths
    repeat; a scraper's fresh ids miss the cache and cost what they did."""
    path = path.split("?", 1)[0].split("#", 1)[0] or "/"
    parts = [p for p in path.split("/") if p]
    templated = ["{id}" if _NUMERIC.match(p) or _HEXID.match(p) else p.lower() for p in parts]
    return "/" + "/".join(templated)


@functools.lru_cache(maxsize=8192)
def endpoint_class(route: str) -> EndpointClass:
    """The class of the first path segment that names one."""
    for segment in route.strip("/").split("/"):
        found = _CLASS_BY_SEGMENT.get(segment)
        if found is not None:
            return found
    return EndpointClass.OTHER


def path_identifier(path: str) -> int | None:
    """The last numeric path segment: what a sequential scraper walks."""
    for part in reversed(path.split("?", 1)[0].split("/")):
        if _NUMERIC.match(part):
            return int(part)
    return None


@dataclass
class _FlowInfo:
    fingerprint: ClientFingerprint = field(default_factory=ClientFingerprint)
    pending: list[Request] = field(default_factory=list)  # awaiting a status, in order


DEFAULT_TRUSTED_PROXIES = ("127.0.0.0/8", "::1/128")


class Observer:
    """Joins sensor events into observations, in event order, in bounded memory."""

    def __init__(
        self,
        *,
        max_flows: int = 200_000,
        trusted_proxies: tuple[str, ...] = DEFAULT_TRUSTED_PROXIES,
        parse_user_agents: bool = False,  # nothing here reads the parsed form
    ) -> None:
        self._flows: OrderedDict[Flow, _FlowInfo] = OrderedDict()
        # (client address, client port) -> its flow, for X-Forwarded-Port joins
        self._by_endpoint: dict[tuple[IPAddress, int], Flow] = {}
        self._max_flows = max_flows
        self._proxies = [ipaddress.ip_network(p) for p in trusted_proxies]
        self._parse_ua = parse_user_agents
        self._hellos = HelloAssembler()
        self.stats: Counter[str] = Counter()

    def feed(self, event: Event) -> list[Observation]:
        if isinstance(event, SynEvent):
            return self._on_syn(event)
        if isinstance(event, ClientHelloSegment):
            return self._on_hello(event)
        if isinstance(event, HttpRequestHead):
            self._on_request_head(event)
            return []
        if isinstance(event, HttpResponseStatus):
            return self._on_response(event)
        if isinstance(event, FlowEnd):
            return self._on_flow_end(event)
        return []

    # ---- events ----

    def _on_syn(self, ev: SynEvent) -> list[Observation]:
        signature, os_family = syn_fingerprint(ev)
        info = self._info(ev.flow)
        info.fingerprint = replace(info.fingerprint, tcp_signature=signature, os_family=os_family)
        return [self._connection(ev.ts_ns, ev.flow, ConnectionStage.SYN, info)]

    def _on_hello(self, ev: ClientHelloSegment) -> list[Observation]:
        complete = self._hellos.feed(ev)
        if complete is None:
            return []
        try:
            hello = parse_client_hello(complete.handshake)
        except ParseError:
            self.stats["hello_unparsable"] += 1
            return []
        info = self._info(ev.flow)
        info.fingerprint = replace(info.fingerprint, ja4=ja4(hello), sni=hello.sni)
        self.stats["hellos"] += 1
        conn = self._connection(ev.ts_ns, ev.flow, ConnectionStage.HELLO, info)
        return [replace(conn, hello_key=hello_key(hello, len(complete.handshake)))]

    def _on_request_head(self, ev: HttpRequestHead) -> None:
        try:
            method, target, version, head = split_request_head(ev.data, ua_parse=self._parse_ua)
        except HttpParseError:
            self.stats["request_unparsable"] += 1
            return
        client, client_port, fingerprint = self._real_client(
            ev.flow, head.x_forwarded_for, head.x_forwarded_port
        )
        path = target.split("?", 1)[0] or "/"
        route = route_template(path)
        request = Request(
            ts=ev.ts_ns / NS_PER_S,
            client=client,
            client_port=client_port,
            method=method,
            path=path,
            route=route,
            endpoint_class=endpoint_class(route),
            status=None,
            user_agent=head.user_agent,
            http_fingerprint=fingerprint_hash(version, head.header_names),
            fingerprint=fingerprint,
            header_names=head.header_names,
            has_cookie=head.has_cookie,
            has_referer=head.has_referer,
            has_accept_language=head.has_accept_language,
        )
        self._info(ev.flow).pending.append(request)
        self.stats["requests"] += 1

    def _on_response(self, ev: HttpResponseStatus) -> list[Observation]:
        info = self._flows.get(ev.flow)
        if info is None or not info.pending:
            self.stats["response_unmatched"] += 1
            return []
        # HTTP/1.1 answers in request order, so the oldest pending is this one.
        request = info.pending.pop(0)
        # Both events carry precise kernel times; the kernel's think_ns has
        # only clock-tick resolution.
        latency = max(ev.ts_ns / NS_PER_S - request.ts, 0.0)
        # Nothing outside the observer holds a pending request, so it is
        # completed in place, not copied: dataclasses.replace, once per
        # request, was a twentieth of the engine's time.
        request.status = ev.status
        request.latency_s = latency
        return [request]

    def _on_flow_end(self, ev: FlowEnd) -> list[Observation]:
        self._hellos.forget(ev.flow)
        info = self._flows.pop(ev.flow, None)
        self._by_endpoint.pop((ev.flow.src, ev.flow.sport), None)
        out: list[Observation] = []
        fingerprint = info.fingerprint if info else ClientFingerprint()
        if info:
            out.extend(info.pending)  # never answered, or the answer was not seen
        if not self._is_proxy(ev.flow.src):
            gap_mean = ev.gap_mean_us / 1e6 if ev.gap_count else None
            gap_cv = (ev.gap_var_us2**0.5 / ev.gap_mean_us
                      if ev.gap_count and ev.gap_mean_us > 0 else None)  # fmt: skip
            out.append(
                FlowShape(
                    ts=ev.ts_ns / NS_PER_S,
                    client=ev.flow.src,
                    client_port=ev.flow.sport,
                    server_port=ev.flow.dport,
                    duration_s=ev.duration_ns / NS_PER_S,
                    bytes_up=ev.bytes,
                    bytes_down=ev.server_bytes,
                    data_segments=ev.data_segments,
                    gap_mean_s=gap_mean,
                    gap_cv=gap_cv,
                    syn_retransmissions=ev.syn_retransmissions,
                    fingerprint=fingerprint,
                )
            )
        return out

    # ---- joins ----

    def _real_client(
        self, flow: Flow, forwarded_for: str | None, forwarded_port: str | None
    ) -> tuple[IPAddress, int, ClientFingerprint]:
        """The client a request is for, and the fingerprint of its own connection.

        Only a trusted proxy's X-Forwarded-For counts, and only its last entry:
        the one the proxy itself appended. Entries before it are whatever the
        client claimed."""
        own = self._flows.get(flow)
        own_fp = own.fingerprint if own else ClientFingerprint()
        if not forwarded_for or not self._is_proxy(flow.src):
            return flow.src, flow.sport, own_fp
        try:
            client = ipaddress.ip_address(forwarded_for.split(",")[-1].strip())
        except ValueError:
            self.stats["forwarded_for_invalid"] += 1
            return flow.src, flow.sport, own_fp
        port = int(forwarded_port) if forwarded_port and forwarded_port.isdigit() else 0
        client_flow = self._by_endpoint.get((client, port))
        info = self._flows.get(client_flow) if client_flow else None
        if info is None:
            self.stats["forwarded_unjoined"] += 1
            return client, port, ClientFingerprint()
        return client, port, info.fingerprint

    def _is_proxy(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self._proxies)

    def _info(self, flow: Flow) -> _FlowInfo:
        info = self._flows.get(flow)
        if info is None:
            info = _FlowInfo()
            self._flows[flow] = info
            self._by_endpoint[(flow.src, flow.sport)] = flow
            if len(self._flows) > self._max_flows:
                old, _ = self._flows.popitem(last=False)
                self._by_endpoint.pop((old.src, old.sport), None)
                self.stats["flows_evicted"] += 1
        else:
            self._flows.move_to_end(flow)
        return info

    def _connection(
        self, ts_ns: int, flow: Flow, stage: ConnectionStage, info: _FlowInfo
    ) -> Connection:
        return Connection(
            ts=ts_ns / NS_PER_S,
            client=flow.src,
            client_port=flow.sport,
            server_port=flow.dport,
            stage=stage,
            fingerprint=info.fingerprint,
            server=flow.dst,
        )
