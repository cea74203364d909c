"""vLLM's Prometheus metrics for one simulated server, in a registry of its own.

Gauges and counters are read from the engine at scrape time (a custom collector), so the
engine's steps never touch Prometheus; only the two latency histograms are observed, once
per finished request. A registry per server lets several simulators share one process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xds_lab.simulator.batching import Engine, Sequence

__all__ = ["SimulatorMetrics"]

_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        model = [self._engine.config.model]
        state = self._engine.state
        counters = self._engine.counters
        families = (
            (GaugeMetricFamily, "vllm:num_requests_running",
             "Number of requests in model execution batches.", state.running),
            (GaugeMetricFamily, "vllm:num_requests_waiting",
             "Number of requests waiting to be processed.", state.waiting),
            (GaugeMetricFamily, "vllm:kv_cache_usage_perc",
             "KV-cache usage. 1 means 100 percent usage.", state.kv_cache_usage),
            (CounterMetricFamily, "vllm:prompt_tokens",
             "Number of prefill tokens processed.", counters.prompt_tokens),
            (CounterMetricFamily, "vllm:generation_tokens",
             "Number of generation tokens processed.", counters.generation_tokens),
            (CounterMetricFamily, "vllm:num_preemptions",
             "Cumulative number of preemption from the engine.", counters.preemptions),
        )  # fmt: skip
        for family, name, doc, value in families:
            metric = family(name, doc, labels=["model_name"])
            metric.add_metric(model, value)
            yield metric
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["model_name", "finished_reason"],
        )
        for reason, value in counters.finished.items():
            success.add_metric([*model, reason], value)
        yield success


class SimulatorMetrics:
    """The registry behind one server's `/metrics`."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self._engine = engine
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            ["model_name"],
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            ["model_name"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )

    def observe(self, seq: Sequence) -> None:
        """Record a finished request's latencies, engine-side: from arrival in the queue."""
        if seq.error is not None or seq.finished_at is None or seq.first_token_at is None:
            return
        model = self._engine.config.model
        self._e2e.labels(model).observe(seq.finished_at - seq.arrival)
        self._ttft.labels(model).observe(seq.first_token_at - seq.arrival)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
