"""GET /metrics in Prometheus text format.

A custom collector reads the control plane at scrape time, so there is no
second set of counters to keep in step. Behind the same token as the rest:
what is blocked, and how much, is not for everyone to read."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from controlplane.agent import ControlPlane
from controlplane.api.deps import AgentDep, AuthDep

router = APIRouter(tags=["metrics"])

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Kernel counter -> (metric, reason label).
_DROPPED = {
    "drop_block": "block",
    "drop_block_cidr": "block_cidr",
    "drop_block_flow": "block_flow",
    "drop_block_hello": "block_hello",
    "drop_block_unparsed": "block_unparsed",
    "drop_tarpit": "tarpit",
}
_THROTTLED = {"drop_throttle_conn": "connections", "drop_throttle_pkt": "packets"}


class PlaneCollector(Collector):
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        stats = self.plane.stats()
        kernel: dict[str, int] = stats["kernel"]
        dropped = CounterMetricFamily(
            "botwall_packets_dropped", "Packets dropped in XDP", labels=["reason"]
        )
        for counter, reason in _DROPPED.items():
            dropped.add_metric([reason], kernel.get(counter, 0))
        yield dropped
        throttled = CounterMetricFamily(
            "botwall_packets_throttled", "Packets dropped by a throttle", labels=["reason"]
        )
        for counter, reason in _THROTTLED.items():
            throttled.add_metric([reason], kernel.get(counter, 0))
        yield throttled
        delayed = CounterMetricFamily(
            "botwall_packets_delayed",
            "SYNs dropped by a tarpit (each costs the client a retransmission)",
            labels=["reason"],
        )
        delayed.add_metric(["tarpit"], kernel.get("drop_tarpit", 0))
        yield delayed
        yield CounterMetricFamily(
            "botwall_events_lost",
            "Ring-buffer records the kernel could not deliver",
            value=stats["events_lost"],
        )
        engine = stats["engine"]
        yield CounterMetricFamily(
            "botwall_engine_events", "Sensor events processed", value=engine["events"]
        )
        yield CounterMetricFamily(
            "botwall_decisions", "Decisions made by the engine", value=engine["decisions"]
        )
        yield GaugeMetricFamily(
            "botwall_live_decisions", "Decisions in force", value=stats["live_decisions"]
        )
        psi = GaugeMetricFamily(
            "botwall_feature_psi",
            "Population stability index of a feature, recent clients against the reference",
            labels=["feature"],
        )
        for feature, value in self.plane.drift_report()["psi"].items():
            psi.add_metric([feature], value)
        yield psi
        samples = self.plane.latency_samples()
        buckets, running = [], 0
        ordered = sorted(samples)
        i = 0
        for bound in LATENCY_BUCKETS:
            while i < len(ordered) and ordered[i] <= bound:
                i += 1
            running = i
            buckets.append((str(bound), running))
        buckets.append(("+Inf", len(ordered)))
        yield HistogramMetricFamily(
            "botwall_decision_latency_seconds",
            "From the event's kernel time to the verdict's map write",
            buckets=buckets,
            sum_value=sum(ordered),
        )


@router.get("/metrics", response_class=Response)
def metrics(plane: AgentDep, _actor: AuthDep) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlaneCollector(plane))
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")
