"""Prometheus metrics of the server, in a registry of their own (one per server object, no module state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class ServerMetrics:
    """Requests, errors, queue depth, batch size, tokens and latencies (``GET /metrics``)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)
        self.requests = Counter("lora_retriever_requests", "Completion requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("lora_retriever_errors", "Error responses, by error type", ["type"], registry=r)
        self.queue_depth = Gauge("lora_retriever_queue_depth", "Requests waiting to join the running batch", registry=r)
        self.running = Gauge("lora_retriever_running", "Requests in the running batch", registry=r)
        self.batch_size = Histogram("lora_retriever_batch_size", "Rows per decoding step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.prompt_tokens = Counter("lora_retriever_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.task_scoring_queue = Gauge("lora_retriever_task_scoring_queue", "Runtime-loaded adapters waiting for or in scoring on "
                                        "the task library", registry=r)
        self.task_scored = Counter("lora_retriever_task_scored", "Runtime-loaded adapters scored on the task library", registry=r)
        self.generation_tokens = Counter("lora_retriever_generation_tokens", "Tokens generated", registry=r)
        self.latency = Histogram("lora_retriever_request_latency_seconds", "Arrival to last token", registry=r,
                                 buckets=LATENCY_BUCKETS)
        self.ttft = Histogram("lora_retriever_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.queue_time = Histogram("lora_retriever_queue_seconds", "Arrival to joining the batch", registry=r,
                                    buckets=LATENCY_BUCKETS)
        self.retrieval = Histogram("lora_retriever_retrieval_seconds", "Batched retrieval of adapters, per call", registry=r,
                                   buckets=LATENCY_BUCKETS)

    def watch_pool(self, pool) -> None:
        """Report the adapter pool's tiers, loads and evictions at every scrape (read from ``pool.describe()``)."""
        self.registry.register(_PoolCollector(pool))


class _PoolCollector:
    def __init__(self, pool):
        self.pool = pool

    def collect(self):
        d = self.pool.describe()
        tiers = GaugeMetricFamily("lora_retriever_adapters_resident", "Adapters per memory tier (host includes device)", labels=["tier"])
        for tier in ("device", "host", "disk"):
            tiers.add_metric([tier], d[tier])
        yield tiers
        yield GaugeMetricFamily("lora_retriever_adapters_pinned", "Adapters used by running rows", value=d["pinned"])
        yield GaugeMetricFamily("lora_retriever_adapters", "Adapters in the pool", value=d["adapters"])
        yield CounterMetricFamily("lora_retriever_adapter_loads", "Adapters read from disk", value=d["loads"])
        yield CounterMetricFamily("lora_retriever_adapter_load_seconds", "Time spent reading adapters from disk", value=d["load_seconds"])
        ev = CounterMetricFamily("lora_retriever_adapter_evictions", "Adapters evicted, by tier", labels=["tier"])
        ev.add_metric(["device"], d["evictions_device"])
        ev.add_metric(["host"], d["evictions_host"])
        yield ev
