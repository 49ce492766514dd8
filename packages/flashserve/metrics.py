"""Prometheus metrics, served by the Truss server's own /metrics endpoint.

The Truss server mounts prometheus_client's default registry at /metrics, so
registering here is all it takes. Engine gauges are read from the engine's
latest step snapshot at scrape time rather than pushed every step.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

REQUESTS = Counter("flashserve_requests", "Chat requests by outcome", ["outcome"])
PROMPT_TOKENS = Counter("flashserve_prompt_tokens", "Prompt tokens received")
GENERATED_TOKENS = Counter("flashserve_generation_tokens", "Tokens generated")
TTFT = Histogram(
    "flashserve_time_to_first_token_seconds",
    "Time from request arrival to its first token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
ITL = Histogram(
    "flashserve_inter_token_latency_seconds",
    "Time between consecutive tokens of a request",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56),
)
REQUEST_SECONDS = Histogram(
    "flashserve_request_duration_seconds",
    "Time from a request reaching the engine to its end, whatever the outcome",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


class EngineCollector:
    """Reads queue depth, running sequences, KV use and prefix-cache hits from the engine."""

    def __init__(self, async_engine: Any) -> None:
        self.async_engine = async_engine

    def collect(self):
        stats = self.async_engine.stats
        gauges = {
            "flashserve_queue_depth": ("Requests waiting for the engine", stats.num_waiting),
            "flashserve_running_sequences": ("Sequences in the running batch", stats.num_running),
            "flashserve_kv_blocks_used": (
                "KV-cache blocks held by sequences",
                stats.kv_blocks_used,
            ),
            "flashserve_kv_blocks_total": ("KV-cache blocks preallocated", stats.kv_blocks_total),
            "flashserve_engine_healthy": (
                "1 while the engine loop is alive",
                int(self.async_engine.healthy),
            ),
            "flashserve_requests_in_flight": (
                "Requests holding an engine stream (waiting, running or being sent)",
                self.async_engine.num_in_flight,
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        rate = stats.prefix_hits / stats.prefix_queries if stats.prefix_queries else 0.0
        yield GaugeMetricFamily(
            "flashserve_prefix_cache_hit_rate",
            "Share of full prompt blocks found cached",
            value=rate,
        )
        yield CounterMetricFamily(
            "flashserve_preemptions", "Sequences preempted for KV space", value=stats.preemptions
        )


_collector: EngineCollector | None = None


def register_engine(async_engine: Any) -> None:
    """Point the engine gauges at this engine (one engine per process)."""
    global _collector
    if _collector is None:
        _collector = EngineCollector(async_engine)
        REGISTRY.register(_collector)
    else:
        _collector.async_engine = async_engine
