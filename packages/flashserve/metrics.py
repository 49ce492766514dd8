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
        if stats.speculation is not None:
            yield from _speculation_metrics(stats.speculation)


def _speculation_metrics(spec: Any):
    """Speculative decoding: proposals, acceptances, and the per-step rule's state."""
    counters = {
        "flashserve_spec_draft_tokens": ("Draft tokens verified (proposed)", spec.draft_tokens),
        "flashserve_spec_accepted_tokens": ("Draft tokens accepted", spec.accepted_tokens),
        "flashserve_spec_drafts": ("Drafts verified", spec.drafts),
        "flashserve_spec_emitted_tokens": (
            "Tokens emitted by drafted sequences in their verification steps",
            spec.emitted_tokens,
        ),
        "flashserve_spec_steps": ("Steps that verified drafts", spec.steps_speculated),
        "flashserve_spec_declined_steps": (
            "Steps whose drafts the measured cost rule turned down",
            spec.steps_declined,
        ),
    }
    for name, (doc, value) in counters.items():
        yield CounterMetricFamily(name, doc, value=value)
    steps = spec.steps_speculated
    gauges = {
        "flashserve_spec_acceptance_rate": (
            "Share of draft tokens accepted",
            spec.accepted_tokens / spec.draft_tokens if spec.draft_tokens else 0.0,
        ),
        "flashserve_spec_accepted_tokens_per_step": (
            "Draft tokens accepted per speculating step, on average",
            spec.accepted_tokens / steps if steps else 0.0,
        ),
        "flashserve_spec_last_step_accepted_tokens": (
            "Draft tokens accepted in the latest speculating step",
            spec.last_step_accepted,
        ),
        "flashserve_spec_step_fixed_seconds": (
            "Measured decode-step cost: fixed part (the cost rule's fit)",
            spec.step_fixed_seconds,
        ),
        "flashserve_spec_step_per_token_seconds": (
            "Measured decode-step cost: per computed token (the cost rule's fit)",
            spec.step_per_token_seconds,
        ),
    }
    for name, (doc, value) in gauges.items():
        yield GaugeMetricFamily(name, doc, value=value)


_collector: EngineCollector | None = None


def register_engine(async_engine: Any) -> None:
    """Point the engine gauges at this engine (one engine per process)."""
    global _collector
    if _collector is None:
        _collector = EngineCollector(async_engine)
        REGISTRY.register(_collector)
    else:
        _collector.async_engine = async_engine
